// Feature maps φ of the linear branch and their backward (SPEC sections 3, 5).
// Applied to each row over its head_dim features.
#pragma once

#include <algorithm>
#include <cmath>

#include "cpu/scalar.h"
#include "slattn/options.h"

namespace slattn::cpu {

inline int64_t feature_dim(FeatureMap, int64_t head_dim) { return head_dim; }

template <typename T>
Matrix<T> apply_feature_map(FeatureMap feature_map, const Matrix<T>& x) {
  Matrix<T> phi(x.rows, feature_dim(feature_map, x.cols));
  for (int64_t r = 0; r < x.rows; ++r) {
    const T* in = x.row(r);
    T* out = phi.row(r);
    switch (feature_map) {
      case FeatureMap::softmax: {
        const T peak = *std::max_element(in, in + x.cols);
        T total = 0;
        for (int64_t c = 0; c < x.cols; ++c) total += out[c] = std::exp(in[c] - peak);
        for (int64_t c = 0; c < x.cols; ++c) out[c] /= total;
        break;
      }
      case FeatureMap::elu:
        for (int64_t c = 0; c < x.cols; ++c) out[c] = in[c] > 0 ? in[c] + T(1) : std::exp(in[c]);
        break;
      case FeatureMap::relu:
        for (int64_t c = 0; c < x.cols; ++c) out[c] = std::max(in[c], T(0));
        break;
    }
  }
  return phi;
}

// dx += dφ pulled back through φ at x (phi = φ(x)).
template <typename T>
void feature_map_backward(FeatureMap feature_map, const Matrix<T>& x, const Matrix<T>& phi, const Matrix<T>& dphi,
                          Matrix<T>& dx) {
  for (int64_t r = 0; r < x.rows; ++r) {
    const T* in = x.row(r);
    const T* p = phi.row(r);
    const T* g = dphi.row(r);
    T* out = dx.row(r);
    switch (feature_map) {
      case FeatureMap::softmax: {
        const T inner = dot(g, p, phi.cols);
        for (int64_t c = 0; c < x.cols; ++c) out[c] += p[c] * (g[c] - inner);
        break;
      }
      case FeatureMap::elu:
        for (int64_t c = 0; c < x.cols; ++c) out[c] += in[c] > 0 ? g[c] : g[c] * std::exp(in[c]);
        break;
      case FeatureMap::relu:
        for (int64_t c = 0; c < x.cols; ++c) out[c] += in[c] > 0 ? g[c] : T(0);
        break;
    }
  }
}

}  // namespace slattn::cpu
