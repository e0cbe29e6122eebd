// Backward of SLA on CUDA (SPEC section 5): the sparse gradients over the row
// and column lists and the linear branch's (fused for the fixed feature maps,
// linear_backward_fused.h, its query side between the sparse dQ and dK/dV
// kernels; through fp32 rows otherwise), the projection's, and the cast of the
// fp32 accumulators into the gradient tensors.
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/hedgehog.h"
#include "cuda/linear_backward_fused.h"
#include "cuda/linear_states.h"
#include "cuda/projection_grads_wgmma.h"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"

namespace slattn::cuda {
namespace {

// Query blocks per partial product of dW = Σ dOᵀ Ol: the fewest that divide
// Mq and give chunks of at least kChunkRows rows, so that the products fill
// the GPU without a partial (D x D) per query block.
int64_t dw_chunk_blocks(const Geometry& g) {
  constexpr int64_t kChunkRows = 2048;
  int64_t blocks = ceil_div(kChunkRows, g.block_q);
  while (blocks < g.q_blocks && g.q_blocks % blocks != 0) ++blocks;
  return blocks < g.q_blocks ? blocks : g.q_blocks;
}

int64_t dw_chunks(const Geometry& g) { return g.q_pairs() * g.q_blocks / dw_chunk_blocks(g); }

// Partial sums of hedgehog's dW_q (from all query rows) and dW_k (all key rows).
int64_t feature_q_chunks(const Geometry& g) { return hedgehog_weight_chunks(g.q_pairs() * g.q_rows()); }
int64_t feature_k_chunks(const Geometry& g) { return hedgehog_weight_chunks(g.kv_pairs() * g.k_rows()); }

bool use_fused_linear(const SlaBackwardParams& p, const Geometry& g) {
  return fused_linear_backward_supported(g, p.feature_map);
}

struct BackwardBuffers {
  void* dos_rows;  // 16-bit elements of the input dtype
  float *dout_rows = nullptr, *delta, *lse_log2, *dq_rows, *dk_rows, *dv_rows;
  float* ol = nullptr;       // Ol rows for dW: from whichever linear path ran
  LinearGradBuffers fused{};  // fused path
  LinearBuffers linear{};     // unfused path, and the rest below
  float *dol = nullptr, *grad_g = nullptr, *grad_c = nullptr, *dqphi = nullptr;
  float *dh_query = nullptr, *dz_query = nullptr, *dh_total = nullptr, *dz_total = nullptr;
  float *dh_key = nullptr, *dz_key = nullptr, *dkphi = nullptr;
  float *dw_partial = nullptr, *db_blocks = nullptr, *db_partial = nullptr;
  float* dw_feature_partial = nullptr;  // hedgehog: dW_q's partials, then dW_k's

  static BackwardBuffers carve(WorkspaceCarver& c, const SlaBackwardParams& p, const Geometry& g) {
    const int64_t q_rows = g.q_pairs() * g.q_rows(), k_rows = g.kv_pairs() * g.k_rows();
    const int64_t state = g.features * g.dim;
    BackwardBuffers b{};
    b.dos_rows = c.take<uint16_t>(q_rows * g.dim);
    if (p.proj_weight) b.dout_rows = c.take<float>(q_rows * g.dim);
    b.delta = c.take<float>(q_rows);
    b.lse_log2 = c.take<float>(q_rows);
    b.dq_rows = c.take<float>(q_rows * g.dim);
    b.dk_rows = c.take<float>(k_rows * g.dim);
    b.dv_rows = c.take<float>(k_rows * g.dim);
    if (p.linear_branch() && use_fused_linear(p, g)) {
      b.fused = LinearGradBuffers::carve(c, g, p.proj_weight != nullptr, p.q.dtype,
                                         use_hopper_linear(p.feature_map));
      b.ol = b.fused.ol;
    } else if (p.linear_branch()) {
      b.linear = LinearBuffers::carve(c, g, p.feature_map);
      b.ol = b.linear.ol;
      if (p.proj_weight) b.dol = c.take<float>(q_rows * g.dim);
      b.grad_g = c.take<float>(q_rows * g.dim);
      b.grad_c = c.take<float>(q_rows);
      b.dqphi = c.take<float>(q_rows * g.features);
      b.dh_query = c.take<float>(g.q_pairs() * g.q_blocks * state);
      b.dz_query = c.take<float>(g.q_pairs() * g.q_blocks * g.features);
      b.dh_total = c.take<float>(g.q_pairs() * state);
      b.dz_total = c.take<float>(g.q_pairs() * g.features);
      b.dh_key = c.take<float>(g.kv_pairs() * g.k_blocks * state);
      b.dz_key = c.take<float>(g.kv_pairs() * g.k_blocks * g.features);
      b.dkphi = c.take<float>(k_rows * g.features);
      if (has_feature_weights(p.feature_map))
        b.dw_feature_partial = c.take<float>((feature_q_chunks(g) + feature_k_chunks(g)) * g.dim * g.dim);
    }
    if (p.proj_weight) b.dw_partial = c.take<float>(dw_chunks(g) * g.dim * g.dim);
    if (p.has_proj_bias) {
      b.db_blocks = c.take<float>(g.q_pairs() * g.q_blocks * g.dim);
      b.db_partial = c.take<float>(g.q_pairs() * g.dim);
    }
    return b;
  }
};

void linear_backward(const SlaBackwardParams& p, const Geometry& g, const RoutingPlanView& plan,
                     const BackwardBuffers& buf, cudaStream_t stream) {
  const LinearBuffers& lin = buf.linear;
  const int64_t state = g.features * g.dim;
  const bool hedgehog = has_feature_weights(p.feature_map);
  linear_forward(g, plan, p.q, p.k, p.v, p.feature_map, p.feature_weights, p.linear_scope, lin, TensorView{},
                 stream);
  if (p.proj_weight) {  // dOl = dO · W
    const int64_t rows = g.q_pairs() * g.q_rows();
    gemm(1, dense(buf.dout_rows, rows, g.dim), dense(static_cast<const float*>(p.proj_weight), g.dim, g.dim),
         dense_out(buf.dol, rows, g.dim), stream);
  }
  linear_row_grads(g, lin.phi_q, lin.query, lin.ol, buf.dol, p.dout_linear, buf.grad_g, buf.grad_c, stream);

  // dQφ = G H_mᵀ (the - c Z_m term is added with the chain rule).
  gemm(g.q_pairs() * g.q_blocks, dense(buf.grad_g, g.block_q, g.dim),
       dense(lin.query.h, g.features, g.dim, /*transposed=*/true), dense_out(buf.dqphi, g.block_q, g.features), stream);
  linear_query_grad(g, p.q, p.feature_map, lin.phi_q, buf.dqphi, buf.grad_c, lin.query, buf.dq_rows, stream);
  if (hedgehog)  // dqphi now holds d(Q W_qᵀ): on through W_q
    hedgehog_input_grads(g.q_pairs() * g.q_rows(), g.dim, buf.dqphi, lin.q_in,
                         static_cast<const float*>(p.feature_weights.q), buf.dq_rows, buf.dw_feature_partial, stream);

  // dH_m = φ(Q_m)ᵀ G_m, dZ_m = -Σ c φ(q), and their totals over m.
  gemm(g.q_pairs() * g.q_blocks, dense(lin.phi_q, g.block_q, g.features, /*transposed=*/true),
       dense(buf.grad_g, g.block_q, g.dim), dense_out(buf.dh_query, g.features, g.dim), stream);
  query_z_grads(g, lin.phi_q, buf.grad_c, buf.dz_query, stream);
  column_sums(buf.dh_query, g.q_pairs(), g.q_blocks, state, buf.dh_total, stream);
  column_sums(buf.dz_query, g.q_pairs(), g.q_blocks, g.features, buf.dz_total, stream);
  key_state_grads(g, plan, p.linear_scope, buf.dh_query, buf.dz_query, buf.dh_total, buf.dz_total, buf.dh_key,
                  buf.dz_key, stream);

  // dKφ = V_n dh_nᵀ (+ dz_n in the chain rule); dV += φ(K_n) dh_n.
  gemm(g.kv_pairs() * g.k_blocks, dense(lin.v_rows, g.block_k, g.dim),
       dense(buf.dh_key, g.features, g.dim, /*transposed=*/true), dense_out(buf.dkphi, g.block_k, g.features), stream);
  linear_key_grad(g, p.k, p.feature_map, lin.phi_k, buf.dkphi, buf.dz_key, buf.dk_rows, stream);
  if (hedgehog)  // dkphi now holds d(K W_kᵀ): on through W_k
    hedgehog_input_grads(g.kv_pairs() * g.k_rows(), g.dim, buf.dkphi, lin.k_in,
                         static_cast<const float*>(p.feature_weights.k), buf.dk_rows,
                         buf.dw_feature_partial + feature_q_chunks(g) * g.dim * g.dim, stream);
  gemm(g.kv_pairs() * g.k_blocks, dense(lin.phi_k, g.block_k, g.features), dense(buf.dh_key, g.features, g.dim),
       dense_out(buf.dv_rows, g.block_k, g.dim), stream, /*beta=*/1.0f);
}

// ol_low: the Ol rows are in the input dtype (the Hopper query kernel's), else fp32.
void projection_backward(const SlaBackwardParams& p, const Geometry& g, const BackwardBuffers& buf, bool ol_low,
                         cudaStream_t stream) {
  if (ol_low) {
    projection_grads_wgmma(g, p.dout, buf.ol, buf.fused.projection_partials, static_cast<float*>(p.d_proj_weight),
                           p.has_proj_bias ? static_cast<float*>(p.d_proj_bias) : nullptr, stream);
    return;
  }
  // dW = Σ dOᵀ Ol: one partial product per chunk of rows (chunks never straddle
  // two (batch, head) pairs), then their sum in order.
  const int64_t chunk_rows = dw_chunk_blocks(g) * g.block_q;
  gemm(dw_chunks(g), dense(buf.dout_rows, chunk_rows, g.dim, /*transposed=*/true),
       dense(buf.ol, chunk_rows, g.dim), dense_out(buf.dw_partial, g.dim, g.dim), stream);
  column_sums(buf.dw_partial, 1, dw_chunks(g), g.dim * g.dim, static_cast<float*>(p.d_proj_weight), stream);
  if (p.has_proj_bias) {
    // db = Σ dO over all rows: by query block, by pair, then in total, so that each pass has enough threads.
    column_sums(buf.dout_rows, g.q_pairs() * g.q_blocks, g.block_q, g.dim, buf.db_blocks, stream);
    column_sums(buf.db_blocks, g.q_pairs(), g.q_blocks, g.dim, buf.db_partial, stream);
    column_sums(buf.db_partial, 1, g.q_pairs(), g.dim, static_cast<float*>(p.d_proj_bias), stream);
  }
}

// Hedgehog's dW_q and dW_k from their partials, in order; a tied W gets the sum
// of all of them. Without the linear branch W has no gradient: zeros.
void feature_weight_backward(const SlaBackwardParams& p, const Geometry& g, const BackwardBuffers& buf,
                             cudaStream_t stream) {
  const int64_t weight = g.dim * g.dim;
  auto* dw_q = static_cast<float*>(p.d_feature_weight_q);
  auto* dw_k = static_cast<float*>(p.d_feature_weight_k);
  if (!p.linear_branch()) {
    SLATTN_CUDA_CHECK(cudaMemsetAsync(dw_q, 0, weight * sizeof(float), stream));
    SLATTN_CUDA_CHECK(cudaMemsetAsync(dw_k, 0, weight * sizeof(float), stream));
    return;
  }
  const int64_t q_chunks = feature_q_chunks(g), k_chunks = feature_k_chunks(g);
  if (p.feature_weights.tied()) {
    column_sums(buf.dw_feature_partial, 1, q_chunks + k_chunks, weight, dw_q, stream);
    return;
  }
  column_sums(buf.dw_feature_partial, 1, q_chunks, weight, dw_q, stream);
  column_sums(buf.dw_feature_partial + q_chunks * weight, 1, k_chunks, weight, dw_k, stream);
}

}  // namespace

size_t sla_backward_workspace_bytes(const SlaBackwardParams& params, const RoutingPlanView& plan) {
  return WorkspaceCarver::bytes_for<BackwardBuffers>(
      params, Geometry::of(params.q, params.k, plan.shape, params.feature_map));
}

void sla_backward(const SlaBackwardParams& p, const RoutingPlanView& plan) {
  const Geometry g = Geometry::of(p.q, p.k, plan.shape, p.feature_map);
  check_cuda_support(g, p.proj_weight, p.proj_dtype, p.feature_map, p.feature_weights);
  auto stream = static_cast<cudaStream_t>(p.stream);
  WorkspaceCarver carver(p.workspace, p.workspace_bytes);
  const BackwardBuffers buf = BackwardBuffers::carve(carver, p, g);
  // The sparse backward writes every row of dq_rows, dk_rows and dv_rows,
  // pad rows as zeros (the batched products read them): no memset.
  const bool fused_linear = p.linear_branch() && use_fused_linear(p, g);
  // The Hopper linear kernels read dO itself: its fp32 rows are written only if one of them refuses.
  const bool dout_rows_deferred = fused_linear && buf.fused.linear_set.block_h != nullptr;
  SparseBackwardArgs sparse{p.q, p.k, p.v, p.out_sparse, p.dout, p.dout_sparse, static_cast<const float*>(p.lse),
                            static_cast<float>(p.scale), buf.dos_rows, dout_rows_deferred ? nullptr : buf.dout_rows,
                            buf.delta, buf.lse_log2, buf.dq_rows, buf.dk_rows, buf.dv_rows};
  // The linear query side runs between the sparse dQ and dK/dV kernels, so that the Hopper dK/dV kernel
  // can add the key side's terms itself (its fp32 rows are then not written, nor read again).
  bool ol_low = false;
  KeyGradLinearTerms key_terms{};
  const auto linear_queries = [&](bool can_add) -> const KeyGradLinearTerms* {
    ol_low = linear_backward_fused_queries(g, plan, p.q, p.k, p.v, p.feature_map, p.linear_scope, buf.fused, p.dout,
                                           buf.dout_rows, static_cast<const float*>(p.proj_weight), p.dout_linear,
                                           buf.dq_rows, p.dq, stream);
    if (!(ol_low && can_add)) return nullptr;
    key_terms = linear_backward_fused_key_terms(g, plan, p.q.dtype, p.feature_map, p.linear_scope, buf.fused, p.dk,
                                                p.dv, stream);
    return &key_terms;
  };
  const bool keys_added =
      sparse_backward(g, plan, sparse, stream, fused_linear ? KeyGradLinearStep(linear_queries) : KeyGradLinearStep());
  if (fused_linear && !keys_added) {
    linear_backward_fused_keys(g, plan, p.k, p.v, p.feature_map, p.linear_scope, buf.fused, ol_low, buf.dk_rows,
                               buf.dv_rows, p.dk, p.dv, stream);
  } else if (!fused_linear && p.linear_branch()) {
    linear_backward(p, g, plan, buf, stream);
  }
  if (p.proj_weight) projection_backward(p, g, buf, ol_low, stream);
  if (has_feature_weights(p.feature_map)) feature_weight_backward(p, g, buf, stream);
  if (!fused_linear) {
    store_rows(buf.dq_rows, g.q_rows(), p.dq, stream);
    store_rows(buf.dk_rows, g.k_rows(), p.dk, stream);
    store_rows(buf.dv_rows, g.k_rows(), p.dv, stream);
  }
}

}  // namespace slattn::cuda
