// Sizes the CUDA kernels share, and the padded fp32 row layouts of the
// workspace: per (batch, head) pair, Mq * block_q query rows (or Nk * block_k
// key rows) of which those past the sequence are zero, so that every block
// is a full, uniformly strided matrix for the batched products.
#pragma once

#include <cstdint>

#include "slattn/macros.h"
#include "slattn/params.h"
#include "slattn/plan.h"

namespace slattn::cuda {

struct Geometry {
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, k_len = 0, block_q = 0, block_k = 0, q_blocks = 0, k_blocks = 0;
  int64_t dim = 0, features = 0;  // head dim D and φ's width F

  static Geometry of(const TensorView& q, const TensorView& k, const PlanShape& shape, FeatureMap feature_map) {
    Geometry g;
    g.batch = q.batch();
    g.heads = q.heads();
    g.kv_heads = k.heads();
    g.q_len = q.length();
    g.k_len = k.length();
    g.block_q = shape.block_q;
    g.block_k = shape.block_k;
    g.q_blocks = shape.q_blocks();
    g.k_blocks = shape.k_blocks();
    g.dim = q.head_dim();
    g.features = feature_dim(feature_map, g.dim);  // width of φ: D, or 2D for hedgehog
    return g;
  }
  SLATTN_HOST_DEVICE int64_t group() const { return heads / kv_heads; }
  SLATTN_HOST_DEVICE int64_t q_pairs() const { return batch * heads; }
  SLATTN_HOST_DEVICE int64_t kv_pairs() const { return batch * kv_heads; }
  SLATTN_HOST_DEVICE int64_t q_rows() const { return q_blocks * block_q; }  // padded query rows per pair
  SLATTN_HOST_DEVICE int64_t k_rows() const { return k_blocks * block_k; }  // padded key rows per pair
  SLATTN_HOST_DEVICE int64_t kv_pair_of(int64_t q_pair) const {
    return (q_pair / heads) * kv_heads + (q_pair % heads) / group();
  }
};

}  // namespace slattn::cuda
