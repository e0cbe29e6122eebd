// The linear branch's backward on Hopper (sm_90a) for the fixed feature maps,
// by the forward's algebra (linear_forward_wgmma.h). The query side
// (linear_query_grads_wgmma.cu): with dOl = dO W (+ the gradient of the
// returned Ol), den_i = φ(q_i)·Z_m + ε and H_m the linear set's product
// (linear_set_states.h), P = dOl H_mᵀ is one warpgroup product per query
// block; then, per row, g_i H_mᵀ = P_i / den_i and c_i = (dOl_i·Ol_i) / den_i =
// φ(q_i)·P_i / den_i² (Ol_i = φ(q_i) H_m / den_i), so Ol itself is needed only
// for the projection's dW (it is formed beside P from the same tile).
// dQφ = g H_mᵀ − c Z_m goes through φ into dQ; dH_m = (φ(Q_m) / den)ᵀ dOl is
// one more product and dZ_m = −Σ c_i φ(q_i). The key side
// (linear_key_grads_wgmma.cu), per key block n:
//   dh_n = Σ over the GQA group's query heads Σ_{m: n in U_m} dH_m,
// the linear set's product with the dH_m, then dKφ = V_n dh_nᵀ + dz_n and
// dV += φ(K_n) dh_n, one pair of products per key block.
// dOl, φ/den, dH_m, dh_n and the products' operands are rounded to the input
// dtype (fp32 accumulation).
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_set_operands.h"
#include "cuda/linear_states.h"
#include "cuda/sparse_kernels.h"
#include "cuda/workspace.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// What linear_query_grads_wgmma reads and writes besides the operands.
struct LinearQueryGradArgs {
  TensorView dout;         // dO (B, H, Lq, D), with a projection; its rows must suit the copy engine
  const float* weight;     // W (D, D) fp32 as (out, in), or null: no projection
  TensorView dout_linear;  // the gradient of the returned Ol, or undefined
  void* ol_low;            // (q pairs, q_rows, D): Ol in the input dtype for dW, with a projection (else null)
  const float* dq_rows;    // (q pairs, q_rows, D): the sparse branch's dQ
  TensorView dq;           // dq = dq_rows + the linear branch's, in the output dtype
  void* dh_low;            // dH_m in the input dtype, padded as linear_set_states.h says
  float* dz_query;         // (q pairs * Mq, F): dZ_m
};

// Per query block m: dq, dH_m, dZ_m and (with a projection) Ol rows, from
// `states` (z_n and their totals) and operands.block_h (key_block_states); the
// other operands are prepared here. Returns nullptr, or why it cannot run
// (nothing launched): no sm_90a code in the build, too little shared memory,
// or dO's layout (the copy engine needs 16-byte aligned row strides).
const char* linear_query_grads_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                     FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                     const LinearSetOperands& operands, const LinearQueryGradArgs& args,
                                     cudaStream_t stream);

// Workspace of linear_key_grads_wgmma, in the input dtype where not said.
struct LinearKeyGradOperands {
  void* phi_k = nullptr;   // (kv pairs, Lk, F): φ(K), written by key_block_states
  void* dh_low = nullptr;  // dH_m (the query kernel's), padded as linear_set_states.h says
  float* dz_key = nullptr;  // (kv pairs * Nk, F) fp32: dz_n

  static LinearKeyGradOperands carve(WorkspaceCarver& carver, const Geometry& g, DType dtype);
};

struct LinearKeyGradArgs {
  const float* dz_query;  // (q pairs * Mq, F)
  const float* dz_total;  // (q pairs, F)
  const float* dk_rows;   // (kv pairs, k_rows, D): the sparse branch's dK
  const float* dv_rows;   // likewise dV
  TensorView dk, dv;      // = those + the linear branch's, in the output dtype
};

// dh_n (in the room of set's h_n, read only to form H_m before) and dz_n from
// the query side's dH_m (operands.dh_low) and dZ_m: the key side's terms, for
// linear_key_grads_wgmma or the sparse dK/dV kernel (sparse_kernels.h) to add
// (args' rows are not read here).
KeyGradLinearTerms linear_key_terms_wgmma(const Geometry& g, const RoutingPlanView& plan, DType dtype,
                                          FeatureMap feature_map, LinearScope scope, const LinearSetOperands& set,
                                          const LinearKeyGradOperands& operands, const LinearKeyGradArgs& args,
                                          cudaStream_t stream);

// The tile maps of the terms' φ(K) (boxes of block_k rows) and dh_n (boxes of
// whole states); false if the copy engine refuses either buffer.
bool key_term_maps(const Geometry& g, DType dtype, const KeyGradLinearTerms& terms, RowTileMap* phi_k,
                   RowTileMap* dh);

// Per key block: dk and dv, from v and `operands` (phi_k and the dH_m of
// dh_low filled before; the rest prepared here, with set's indicator; dh_n
// takes the room of set's h_n, which was read only to form H_m). Returns nullptr, or why it
// cannot run (nothing launched): no sm_90a code, too little shared memory, or
// v's layout (the copy engine needs 16-byte aligned row strides).
const char* linear_key_grads_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& v,
                                   FeatureMap feature_map, LinearScope scope, const LinearSetOperands& set,
                                   const LinearKeyGradOperands& operands, const LinearKeyGradArgs& args,
                                   cudaStream_t stream);

}  // namespace slattn::cuda
