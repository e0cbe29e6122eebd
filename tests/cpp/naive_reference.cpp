#include "naive_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace slattn_test {
namespace {

using slattn::FeatureMap;
using slattn::LinearScope;

// Row `l` of the (b, h) slice of a dense (B, H, L, D) tensor.
template <typename T>
const T* row_of(const std::vector<T>& x, int64_t heads, int64_t len, int64_t dim, int64_t b, int64_t h, int64_t l) {
  return x.data() + ((b * heads + h) * len + l) * dim;
}

template <typename T>
void softmax_in_place(std::vector<T>& values) {
  const T peak = *std::max_element(values.begin(), values.end());
  T total = 0;
  for (T& value : values) total += value = std::exp(value - peak);
  for (T& value : values) value /= total;
}

// φ(x) of SPEC section 3; `weight` is hedgehog's W (D, D) as (out, in).
template <typename T>
std::vector<T> feature_map(FeatureMap map, const T* x, int64_t dim, const std::vector<T>& weight) {
  std::vector<T> phi(x, x + dim);
  switch (map) {
    case FeatureMap::softmax:
      softmax_in_place(phi);
      break;
    case FeatureMap::hedgehog: {
      // [x Wᵀ, −x Wᵀ], then softmax over all 2d entries.
      phi.assign(static_cast<size_t>(2 * dim), T(0));
      for (int64_t out = 0; out < dim; ++out) {
        for (int64_t in = 0; in < dim; ++in) phi[out] += x[in] * weight[out * dim + in];
        phi[dim + out] = -phi[out];
      }
      softmax_in_place(phi);
      break;
    }
    case FeatureMap::elu:  // elu(x) + 1, which is exp(x) for x <= 0
      for (T& value : phi) value = value > 0 ? value + T(1) : std::exp(value);
      break;
    case FeatureMap::relu:
      for (T& value : phi) value = std::max(value, T(0));
      break;
  }
  return phi;
}

bool in_linear_set(int8_t block_class, LinearScope scope) {
  return scope == LinearScope::marginal ? block_class == 0 : block_class != -1;
}

// Mean of rows [begin, end) of an (L, D) matrix.
std::vector<double> mean_rows(const double* x, int64_t begin, int64_t end, int64_t dim) {
  std::vector<double> mean(static_cast<size_t>(dim), 0.0);
  for (int64_t r = begin; r < end; ++r)
    for (int64_t d = 0; d < dim; ++d) mean[d] += x[r * dim + d];
  for (double& value : mean) value /= static_cast<double>(end - begin);
  return mean;
}

double sum_of_products(const std::vector<double>& a, const std::vector<double>& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

}  // namespace

double Problem::softmax_scale() const { return scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(dim)); }

int64_t reference_critical_count(double topk, int64_t k_blocks) {
  const auto count = static_cast<int64_t>(std::floor(topk * static_cast<double>(k_blocks)));
  return std::clamp<int64_t>(count, 1, k_blocks);
}

int64_t reference_negligible_count(double topk, double negligible, int64_t k_blocks) {
  const auto count = static_cast<int64_t>(std::floor(negligible * static_cast<double>(k_blocks)));
  return std::min(count, k_blocks - reference_critical_count(topk, k_blocks));
}

std::vector<double> reference_block_scores(const Problem& p, const std::vector<double>& q,
                                           const std::vector<double>& k) {
  const int64_t mq = p.q_blocks(), nk = p.k_blocks(), dim = p.dim;
  std::vector<double> scores(static_cast<size_t>(p.map_count()));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const double* q_head = row_of(q, p.q_heads, p.q_len, dim, b, h, 0);
      const double* k_head = row_of(k, p.kv_heads, p.k_len, dim, b, p.kv_head_of(h), 0);
      // Step 1: K~ = K - mean over rows of K.
      const std::vector<double> k_mean = mean_rows(k_head, 0, p.k_len, dim);
      std::vector<double> k_smooth(k_head, k_head + p.k_len * dim);
      for (int64_t j = 0; j < p.k_len; ++j)
        for (int64_t d = 0; d < dim; ++d) k_smooth[j * dim + d] -= k_mean[d];
      // Steps 2-3: block means (a partial block averages its real rows), then dots.
      for (int64_t m = 0; m < mq; ++m) {
        const std::vector<double> q_bar =
            mean_rows(q_head, m * p.block_q, std::min(p.q_len, (m + 1) * p.block_q), dim);
        for (int64_t n = 0; n < nk; ++n) {
          const std::vector<double> k_bar =
              mean_rows(k_smooth.data(), n * p.block_k, std::min(p.k_len, (n + 1) * p.block_k), dim);
          scores[((b * p.q_heads + h) * mq + m) * nk + n] = sum_of_products(q_bar, k_bar);
        }
      }
    }
  }
  return scores;
}

std::vector<int8_t> reference_block_map(const Problem& p, const std::vector<double>& q,
                                        const std::vector<double>& k) {
  const std::vector<double> scores = reference_block_scores(p, q, k);
  const int64_t nk = p.k_blocks();
  const int64_t n_crit = reference_critical_count(p.topk, nk);
  const int64_t n_negl = reference_negligible_count(p.topk, p.negligible, nk);
  std::vector<int8_t> map(scores.size());
  for (size_t row = 0; row < scores.size(); row += static_cast<size_t>(nk)) {
    const double* s = scores.data() + row;
    std::vector<int64_t> order(static_cast<size_t>(nk));
    std::iota(order.begin(), order.end(), 0);
    // Highest score first; equal scores rank the lower block index first.
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
    for (int64_t rank = 0; rank < nk; ++rank) {
      const int8_t block_class = rank < n_crit ? 1 : rank >= nk - n_negl ? -1 : 0;
      map[row + static_cast<size_t>(order[rank])] = block_class;
    }
  }
  return map;
}

std::vector<int8_t> expand_block_map(const Problem& p, const int8_t* head_map) {
  std::vector<int8_t> mask(static_cast<size_t>(p.q_len * p.k_len));
  for (int64_t i = 0; i < p.q_len; ++i)
    for (int64_t j = 0; j < p.k_len; ++j)
      mask[i * p.k_len + j] = head_map[(i / p.block_q) * p.k_blocks() + j / p.block_k];
  return mask;
}

template <typename T>
Outputs<T> reference_forward(const Problem& p, const std::vector<int8_t>& block_map, const Inputs<T>& in) {
  const int64_t dim = p.dim;
  const T scale = static_cast<T>(p.softmax_scale());
  const T epsilon = static_cast<T>(slattn::kLinearEpsilon);
  Outputs<T> result;
  result.out.assign(static_cast<size_t>(p.q_count()), T(0));
  result.out_sparse = result.out;
  result.out_linear = result.out;
  result.lse.assign(static_cast<size_t>(p.lse_count()), T(0));
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t kv = p.kv_head_of(h);
      const std::vector<int8_t> mask =
          expand_block_map(p, block_map.data() + (b * p.q_heads + h) * p.q_blocks() * p.k_blocks());
      const int64_t features = p.features();
      const std::vector<T>& weight_q = in.feature_weight_q;
      const std::vector<T>& weight_k = in.feature_weight_k.empty() ? weight_q : in.feature_weight_k;
      std::vector<std::vector<T>> phi_k;
      for (int64_t j = 0; j < p.k_len; ++j)
        phi_k.push_back(feature_map(p.feature_map, row_of(in.k, p.kv_heads, p.k_len, dim, b, kv, j), dim, weight_k));

      for (int64_t i = 0; i < p.q_len; ++i) {
        const int64_t row = (b * p.q_heads + h) * p.q_len + i;
        const T* q_i = row_of(in.q, p.q_heads, p.q_len, dim, b, h, i);
        const int8_t* classes = mask.data() + i * p.k_len;
        T* os = result.out_sparse.data() + row * dim;
        T* ol = result.out_linear.data() + row * dim;

        // Sparse branch (section 2): softmax over the critical keys only.
        std::vector<T> logits(static_cast<size_t>(p.k_len), -std::numeric_limits<T>::infinity());
        T peak = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < p.k_len; ++j) {
          if (classes[j] != 1) continue;
          const T* k_j = row_of(in.k, p.kv_heads, p.k_len, dim, b, kv, j);
          T x = 0;
          for (int64_t d = 0; d < dim; ++d) x += q_i[d] * k_j[d];
          logits[j] = scale * x;
          peak = std::max(peak, logits[j]);
        }
        if (peak == -std::numeric_limits<T>::infinity()) {
          result.lse[row] = peak;  // no critical key: Os stays 0
        } else {
          T total = 0;
          for (int64_t j = 0; j < p.k_len; ++j)
            if (classes[j] == 1) total += std::exp(logits[j] - peak);
          const T lse = peak + std::log(total);
          result.lse[row] = lse;
          for (int64_t j = 0; j < p.k_len; ++j) {
            if (classes[j] != 1) continue;
            const T weight = std::exp(logits[j] - lse);
            const T* v_j = row_of(in.v, p.kv_heads, p.k_len, dim, b, kv, j);
            for (int64_t d = 0; d < dim; ++d) os[d] += weight * v_j[d];
          }
        }

        // Linear branch (section 3): H = Σ φ(k_j)ᵀ v_j and Z = Σ φ(k_j) over
        // exactly the keys of U_m, summed directly.
        std::vector<T> state_h(static_cast<size_t>(features * dim), T(0));
        std::vector<T> state_z(static_cast<size_t>(features), T(0));
        bool any = false;
        for (int64_t j = 0; j < p.k_len; ++j) {
          if (!in_linear_set(classes[j], p.scope)) continue;
          any = true;
          const T* v_j = row_of(in.v, p.kv_heads, p.k_len, dim, b, kv, j);
          for (int64_t f = 0; f < features; ++f) {
            state_z[f] += phi_k[j][f];
            for (int64_t d = 0; d < dim; ++d) state_h[f * dim + d] += phi_k[j][f] * v_j[d];
          }
        }
        if (any) {
          const std::vector<T> phi_q = feature_map(p.feature_map, q_i, dim, weight_q);
          T denominator = epsilon;
          for (int64_t f = 0; f < features; ++f) denominator += phi_q[f] * state_z[f];
          for (int64_t d = 0; d < dim; ++d) {
            T numerator = 0;
            for (int64_t f = 0; f < features; ++f) numerator += phi_q[f] * state_h[f * dim + d];
            ol[d] = numerator / denominator;
          }
        }

        // Combine (section 4): out = Os + Ol Wᵀ + b.
        T* out = result.out.data() + row * dim;
        for (int64_t r = 0; r < dim; ++r) {
          out[r] = os[r];
          if (in.proj_weight.empty()) continue;
          for (int64_t c = 0; c < dim; ++c) out[r] += in.proj_weight[r * dim + c] * ol[c];
          if (!in.proj_bias.empty()) out[r] += in.proj_bias[r];
        }
      }
    }
  }
  return result;
}

template Outputs<double> reference_forward(const Problem&, const std::vector<int8_t>&, const Inputs<double>&);
template Outputs<float> reference_forward(const Problem&, const std::vector<int8_t>&, const Inputs<float>&);

Gradients reference_gradients(const Problem& p, const std::vector<int8_t>& block_map, const Inputs<double>& inputs,
                              const std::vector<double>& dout, const std::vector<double>& dout_sparse,
                              const std::vector<double>& dout_linear) {
  // Central differences in double: truncation ~step², round-off ~1e-16/step,
  // both near 1e-10 at this step for inputs of order one.
  constexpr double kStep = 1e-5;
  Inputs<double> point = inputs;
  auto loss = [&] {
    const Outputs<double> o = reference_forward(p, block_map, point);
    double total = sum_of_products(o.out, dout);
    if (!dout_sparse.empty()) total += sum_of_products(o.out_sparse, dout_sparse);
    if (!dout_linear.empty()) total += sum_of_products(o.out_linear, dout_linear);
    return total;
  };
  auto differentiate = [&](std::vector<double>& parameter) {
    std::vector<double> gradient(parameter.size());
    for (size_t e = 0; e < parameter.size(); ++e) {
      const double saved = parameter[e];
      parameter[e] = saved + kStep;
      const double above = loss();
      parameter[e] = saved - kStep;
      const double below = loss();
      parameter[e] = saved;
      gradient[e] = (above - below) / (2 * kStep);
    }
    return gradient;
  };
  Gradients grads;
  grads.dq = differentiate(point.q);
  grads.dk = differentiate(point.k);
  grads.dv = differentiate(point.v);
  grads.d_proj_weight = differentiate(point.proj_weight);
  grads.d_proj_bias = differentiate(point.proj_bias);
  grads.d_feature_weight_q = differentiate(point.feature_weight_q);  // through both uses when tied
  grads.d_feature_weight_k = differentiate(point.feature_weight_k);
  return grads;
}

}  // namespace slattn_test
