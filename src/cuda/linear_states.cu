#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/hedgehog.h"
#include "cuda/linear_states.h"

namespace slattn::cuda {
namespace {

// φ(x) as padded fp32 rows; hedgehog also keeps x itself in x_rows.
void phi_rows(const TensorView& x, int64_t rows_padded, FeatureMap feature_map, const void* weight, float* x_rows,
              float* phi, cudaStream_t stream) {
  if (has_feature_weights(feature_map)) {
    hedgehog_rows(x, rows_padded, static_cast<const float*>(weight), x_rows, phi, stream);
  } else {
    feature_rows(x, rows_padded, feature_map, phi, nullptr, stream);
  }
}

}  // namespace

KeyStates KeyStates::carve(WorkspaceCarver& carver, const Geometry& g) {
  const int64_t state = g.features * g.dim;
  KeyStates s;
  s.h = carver.take<float>(g.kv_pairs() * g.k_blocks * state);
  s.z = carver.take<float>(g.kv_pairs() * g.k_blocks * g.features);
  s.total_h = carver.take<float>(g.kv_pairs() * state);
  s.total_z = carver.take<float>(g.kv_pairs() * g.features);
  return s;
}

LinearBuffers LinearBuffers::carve(WorkspaceCarver& carver, const Geometry& g, FeatureMap feature_map) {
  const int64_t state = g.features * g.dim;
  LinearBuffers b;
  if (has_feature_weights(feature_map)) {
    b.k_in = carver.take<float>(g.kv_pairs() * g.k_rows() * g.dim);
    b.q_in = carver.take<float>(g.q_pairs() * g.q_rows() * g.dim);
  }
  b.phi_k = carver.take<float>(g.kv_pairs() * g.k_rows() * g.features);
  b.v_rows = carver.take<float>(g.kv_pairs() * g.k_rows() * g.dim);
  b.keys = KeyStates::carve(carver, g);
  b.phi_q = carver.take<float>(g.q_pairs() * g.q_rows() * g.features);
  b.query.h = carver.take<float>(g.q_pairs() * g.q_blocks * state);
  b.query.z = carver.take<float>(g.q_pairs() * g.q_blocks * g.features);
  b.query.non_empty = carver.take<int8_t>(g.q_pairs() * g.q_blocks);
  b.ol = carver.take<float>(g.q_pairs() * g.q_rows() * g.dim);
  return b;
}

void linear_forward(const Geometry& g, const RoutingPlanView& plan, const TensorView& q, const TensorView& k,
                    const TensorView& v, FeatureMap feature_map, const FeatureWeights& feature_weights,
                    LinearScope scope, const LinearBuffers& buf, const TensorView& out_linear, cudaStream_t stream) {
  const int64_t state = g.features * g.dim;
  phi_rows(k, g.k_rows(), feature_map, feature_weights.k, buf.k_in, buf.phi_k, stream);
  feature_rows(v, g.k_rows(), feature_map, nullptr, buf.v_rows, stream);

  // h_n = φ(K_n)ᵀ V_n for every key block n, as one batched product.
  gemm(g.kv_pairs() * g.k_blocks, dense(buf.phi_k, g.block_k, g.features, /*transposed=*/true),
       dense(buf.v_rows, g.block_k, g.dim), dense_out(buf.keys.h, g.features, g.dim), stream);
  column_sums(buf.phi_k, g.kv_pairs() * g.k_blocks, g.block_k, g.features, buf.keys.z, stream);
  column_sums(buf.keys.h, g.kv_pairs(), g.k_blocks, state, buf.keys.total_h, stream);
  column_sums(buf.keys.z, g.kv_pairs(), g.k_blocks, g.features, buf.keys.total_z, stream);
  assemble_query_states(g, plan, scope, buf.keys.h, buf.keys.z, buf.keys.total_h, buf.keys.total_z, buf.query, stream);

  // Numerators φ(Q_m) H_m for every query block m; then the division.
  phi_rows(q, g.q_rows(), feature_map, feature_weights.q, buf.q_in, buf.phi_q, stream);
  gemm(g.q_pairs() * g.q_blocks, dense(buf.phi_q, g.block_q, g.features), dense(buf.query.h, g.features, g.dim),
       dense_out(buf.ol, g.block_q, g.dim), stream);
  linear_output(g, buf.phi_q, buf.query, buf.ol, out_linear, stream);
}

}  // namespace slattn::cuda
