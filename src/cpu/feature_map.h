// Feature maps φ of the linear branch and their backward (SPEC sections 3, 5).
// Applied to each row: the fixed maps over its head_dim features, hedgehog
// as softmax([x Wᵀ, −x Wᵀ]) over 2 · head_dim.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/scalar.h"
#include "slattn/options.h"

namespace slattn::cpu {

// Row-wise softmax in place over `width` values.
template <typename T>
void softmax_row(T* values, int64_t width) {
  const T peak = *std::max_element(values, values + width);
  T total = 0;
  for (int64_t c = 0; c < width; ++c) total += values[c] = std::exp(values[c] - peak);
  for (int64_t c = 0; c < width; ++c) values[c] /= total;
}

// φ as applied to q or to k: the map, and for hedgehog its weight W (D, D)
// as (out, in); weight is empty for the fixed maps.
template <typename T>
struct Phi {
  FeatureMap kind = FeatureMap::softmax;
  Matrix<T> weight;

  static Phi of(FeatureMap kind, const void* weight, DType dtype, int64_t dim) {
    Phi phi;
    phi.kind = kind;
    if (has_feature_weights(kind)) {
      phi.weight = Matrix<T>(dim, dim);
      phi.weight.values = load_vector<T>(weight, dim * dim, dtype);
    }
    return phi;
  }

  int64_t features(int64_t dim) const { return feature_dim(kind, dim); }

  Matrix<T> apply(const Matrix<T>& x) const {
    Matrix<T> phi(x.rows, features(x.cols));
    for (int64_t r = 0; r < x.rows; ++r) {
      const T* in = x.row(r);
      T* out = phi.row(r);
      switch (kind) {
        case FeatureMap::softmax:
          std::copy(in, in + x.cols, out);
          softmax_row(out, x.cols);
          break;
        case FeatureMap::elu:
          for (int64_t c = 0; c < x.cols; ++c) out[c] = in[c] > 0 ? in[c] + T(1) : std::exp(in[c]);
          break;
        case FeatureMap::relu:
          for (int64_t c = 0; c < x.cols; ++c) out[c] = std::max(in[c], T(0));
          break;
        case FeatureMap::hedgehog:
          // pre = x Wᵀ in the first half, −pre in the second, then one softmax over both.
          for (int64_t c = 0; c < x.cols; ++c) {
            out[c] = dot(weight.row(c), in, x.cols);
            out[x.cols + c] = -out[c];
          }
          softmax_row(out, 2 * x.cols);
          break;
      }
    }
    return phi;
  }

  // dx += dφ pulled back through φ at x (phi = φ(x)); for hedgehog also
  // d_weight (D, D, may be null) += Σ_rows d(pre)ᵀ x.
  void backward(const Matrix<T>& x, const Matrix<T>& phi, const Matrix<T>& dphi, Matrix<T>& dx,
                double* d_weight) const {
    const int64_t dim = x.cols;
    std::vector<T> d_pre(static_cast<size_t>(dim));
    for (int64_t r = 0; r < x.rows; ++r) {
      const T* in = x.row(r);
      const T* p = phi.row(r);
      const T* g = dphi.row(r);
      T* out = dx.row(r);
      switch (kind) {
        case FeatureMap::softmax: {
          const T inner = dot(g, p, dim);
          for (int64_t c = 0; c < dim; ++c) out[c] += p[c] * (g[c] - inner);
          break;
        }
        case FeatureMap::elu:
          for (int64_t c = 0; c < dim; ++c) out[c] += in[c] > 0 ? g[c] : g[c] * std::exp(in[c]);
          break;
        case FeatureMap::relu:
          for (int64_t c = 0; c < dim; ++c) out[c] += in[c] > 0 ? g[c] : T(0);
          break;
        case FeatureMap::hedgehog: {
          // Through the softmax over 2D, then both halves back to pre = x Wᵀ
          // (the second half holds −pre, hence the minus).
          const T inner = dot(g, p, 2 * dim);
          for (int64_t c = 0; c < dim; ++c)
            d_pre[c] = p[c] * (g[c] - inner) - p[dim + c] * (g[dim + c] - inner);
          for (int64_t c = 0; c < dim; ++c) axpy(d_pre[c], weight.row(c), out, dim);  // dx = d(pre) W
          if (d_weight)
            for (int64_t c = 0; c < dim; ++c)
              for (int64_t e = 0; e < dim; ++e) d_weight[c * dim + e] += double(d_pre[c]) * double(in[e]);
          break;
        }
      }
    }
  }
};

}  // namespace slattn::cpu
