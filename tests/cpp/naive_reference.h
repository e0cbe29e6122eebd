// An independent, deliberately naive implementation of SPEC.md sections 1-5,
// written from the spec and not from src/ (STYLE.md rule 6): the oracle the
// C++ tests hold the library to.
//
// Tensors are dense std::vectors in the logical order (B, H, L, D); block maps
// are (B, Hq, Mq, Nk). Nothing here is fast: every query row walks every key.
#pragma once

#include <cstdint>
#include <vector>

#include "slattn/options.h"

namespace slattn_test {

// Shapes and options of one SLA problem.
struct Problem {
  int64_t batch = 1;
  int64_t q_heads = 1;
  int64_t kv_heads = 1;
  int64_t q_len = 1;
  int64_t k_len = 1;
  int64_t dim = 8;
  int64_t block_q = 16;
  int64_t block_k = 16;
  double topk = 0.5;
  double negligible = 0.0;
  double scale = 0.0;  // 0 means the spec's default 1/sqrt(dim)
  slattn::FeatureMap feature_map = slattn::FeatureMap::softmax;
  slattn::LinearScope scope = slattn::LinearScope::marginal;
  bool tie_feature_weights = true;  // hedgehog: one W for q and k

  int64_t q_blocks() const { return (q_len + block_q - 1) / block_q; }  // Mq
  int64_t k_blocks() const { return (k_len + block_k - 1) / block_k; }  // Nk
  int64_t kv_head_of(int64_t q_head) const { return q_head / (q_heads / kv_heads); }
  double softmax_scale() const;
  int64_t q_count() const { return batch * q_heads * q_len * dim; }
  int64_t kv_count() const { return batch * kv_heads * k_len * dim; }
  int64_t lse_count() const { return batch * q_heads * q_len; }
  int64_t map_count() const { return batch * q_heads * q_blocks() * k_blocks(); }
  // Width of φ: 2 · dim for hedgehog, dim for the fixed maps (SPEC section 3).
  int64_t features() const { return feature_map == slattn::FeatureMap::hedgehog ? 2 * dim : dim; }
};

// An empty proj_weight means no projection; proj_weight is (D, D) as (out, in).
// Hedgehog's W_q and W_k are (D, D) as (out, in) too; an empty
// feature_weight_k means tied: k uses feature_weight_q.
template <typename T>
struct Inputs {
  std::vector<T> q, k, v;
  std::vector<T> proj_weight, proj_bias;
  std::vector<T> feature_weight_q, feature_weight_k;
};

template <typename T>
struct Outputs {
  std::vector<T> out, out_sparse, out_linear;  // (B, Hq, Lq, D)
  std::vector<T> lse;                          // (B, Hq, Lq); -inf for a row with no critical key
};

// d_feature_weight_k is empty for tied weights: d_feature_weight_q is then the
// gradient of the one W through both uses.
struct Gradients {
  std::vector<double> dq, dk, dv, d_proj_weight, d_proj_bias;
  std::vector<double> d_feature_weight_q, d_feature_weight_k;
};

// n_crit and n_negl of SPEC section 1, from the formulas as written there.
int64_t reference_critical_count(double topk, int64_t k_blocks);
int64_t reference_negligible_count(double topk, double negligible, int64_t k_blocks);

// Pooled block scores S[m, n] = q̄_m · k̄_n over smoothed K, (B, Hq, Mq, Nk).
std::vector<double> reference_block_scores(const Problem& problem, const std::vector<double>& q,
                                           const std::vector<double>& k);

// The block map (B, Hq, Mq, Nk) of the pooled router: ranks each row's scores.
std::vector<int8_t> reference_block_map(const Problem& problem, const std::vector<double>& q,
                                        const std::vector<double>& k);

// Expands the (Mq, Nk) block map of one head into the class of every (query,
// key) pair, (Lq, Lk).
std::vector<int8_t> expand_block_map(const Problem& problem, const int8_t* head_map);

// SPEC sections 2-4 computed densely in T: masked softmax for the sparse
// branch, and H, Z of the linear branch summed directly over the keys of U_m.
template <typename T>
Outputs<T> reference_forward(const Problem& problem, const std::vector<int8_t>& block_map, const Inputs<T>& inputs);

// Gradients of sum(out · dout) + sum(Os · dout_sparse) + sum(Ol · dout_linear)
// by central finite differences of reference_forward, routing held fixed
// (SPEC section 5: the hard routing passes no gradient). Empty dout_sparse or
// dout_linear drop that term. Meant for tiny shapes only.
Gradients reference_gradients(const Problem& problem, const std::vector<int8_t>& block_map,
                              const Inputs<double>& inputs, const std::vector<double>& dout,
                              const std::vector<double>& dout_sparse, const std::vector<double>& dout_linear);

}  // namespace slattn_test
