// Kernels of the linear branch on CUDA (SPEC sections 3 and 5) other than the
// dense products, which go through gemm(). Rows use the padded fp32 layouts of
// geometry.h. Each launcher checks its launch.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// phi = φ(x) and/or raw = x, as padded fp32 rows (B*H, rows_padded, D); pad rows are zero.
// The fixed maps only: hedgehog's φ comes from hedgehog_rows (hedgehog.h).
void feature_rows(const TensorView& x, int64_t rows_padded, FeatureMap feature_map, float* phi, float* raw,
                  cudaStream_t stream);

// dst[b, c] = Σ_r src[b, r, c] for a (batches, rows, width) array (a fixed order: deterministic).
// Parallel over (b, c), and over the rows within a thread block (8 warps).
void column_sums(const float* src, int64_t batches, int64_t rows, int64_t width, float* dst, cudaStream_t stream);

// H_m and Z_m of every query block (total minus excluded, or the included
// sum, whichever is shorter), and whether U_m is non-empty.
struct QueryStates {
  float* h;           // (B*Hq*Mq, F, D)
  float* z;           // (B*Hq*Mq, F)
  int8_t* non_empty;  // (B*Hq*Mq)
};
void assemble_query_states(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* key_h,
                           const float* key_z, const float* total_h, const float* total_z, QueryStates out,
                           cudaStream_t stream);

// In place: ol = numerator / (φ(q)·Z_m + ε), 0 where U_m is empty; also writes out_linear if defined.
void linear_output(const Geometry& g, const float* phi_q, QueryStates states, float* ol, const TensorView& out_linear,
                   cudaStream_t stream);

// out = pre + bias, cast to the output dtype (rows of `pre` padded).
void combine_output(const Geometry& g, const float* pre, const float* bias, const TensorView& out, cudaStream_t stream);

// Backward per query row: g = dOl / den and c = (dOl · Ol) / den, with
// dOl = dol_from_proj (may be null) + dout_linear (may be undefined).
void linear_row_grads(const Geometry& g, const float* phi_q, QueryStates states, const float* ol,
                      const float* dol_from_proj, const TensorView& dout_linear, float* grad_g, float* grad_c,
                      cudaStream_t stream);

// dq += φ'(q)ᵀ (dqphi - c Z_m). For hedgehog, instead, the first D columns
// of each dqphi row become d(q W_qᵀ), for hedgehog_input_grads; dq is untouched.
void linear_query_grad(const Geometry& g, const TensorView& q, FeatureMap feature_map, const float* phi_q,
                       float* dqphi, const float* grad_c, QueryStates states, float* dq, cudaStream_t stream);

// dZ_m = -Σ_{i in m} c_i φ(q_i)
void query_z_grads(const Geometry& g, const float* phi_q, const float* grad_c, float* dz, cudaStream_t stream);

// dh_n = Σ over the query heads of the group and the query blocks whose U_m holds n of dH_m; likewise dz_n.
void key_state_grads(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* dh_query,
                     const float* dz_query, const float* dh_total, const float* dz_total, float* dh_key,
                     float* dz_key, cudaStream_t stream);

// dk += φ'(k)ᵀ (dkphi + dz_n). For hedgehog, instead, the first D columns
// of each dkphi row become d(k W_kᵀ), for hedgehog_input_grads; dk is untouched.
void linear_key_grad(const Geometry& g, const TensorView& k, FeatureMap feature_map, const float* phi_k,
                     float* dkphi, const float* dz_key, float* dk, cudaStream_t stream);

// Casts padded fp32 rows (B*H, rows_padded, D) into a strided output tensor.
void store_rows(const float* rows, int64_t rows_padded, const TensorView& out, cudaStream_t stream);

}  // namespace slattn::cuda
