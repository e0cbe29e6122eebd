// The linear branch's forward on Hopper (sm_90a) for the fixed feature maps,
// without per-block states. With the totals H = Σ_n h_n and Z = Σ_n z_n, and
// since φ(Q_m) h_n = (φ(Q_m) φ(K_n)ᵀ) V_n, the numerator and denominator of
// Ol (SPEC section 3) are either sums over the blocks of U_m or the totals'
// minus the blocks outside U_m, whichever list is shorter:
//   φ(Q_m) H_m = Σ_{n in U_m} S_n V_n  or  φ(Q_m) H − Σ_{n not in U_m} S_n V_n,
//   φ(q_i)·Z_m = Σ_{n in U_m} rowsum_i(S_n)  or  φ(q_i)·Z − Σ_{n not in U_m} rowsum_i(S_n),
// with S_n = φ(Q_m) φ(K_n)ᵀ. For the default marginal scope the blocks
// outside U_m are the critical ones: the kernel walks the sparse branch's
// tiles again, with φ(K_n) in place of K_n and no softmax, on the sparse
// forward's warp-specialised, persistent design, and adds Ol Wᵀ + b to the
// output in its epilogue. φ(Q), φ(K), H and W are rounded to the input
// dtype for the products (fp32 accumulation); φ(q)·Z is taken in fp32.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_states.h"
#include "cuda/workspace.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// Workspace of linear_output_wgmma, in the input dtype where not said.
struct LinearSetOperands {
  void* phi_q = nullptr;         // (q pairs, Lq, D): φ(Q)
  void* phi_k = nullptr;         // (kv pairs, Lk, D): φ(K), written by key_block_states
  float* denominator = nullptr;  // (q pairs, Lq) fp32: φ(q)·Z + ε with the total Z
  void* total_h = nullptr;       // (kv pairs, D, D): H
  void* weight = nullptr;        // (D, D): the projection's W as (out, in)

  static LinearSetOperands carve(WorkspaceCarver& carver, const Geometry& g, DType dtype);
};

// Ol of every query block (written to out_linear when defined) and, with a
// projection, out += Ol Wᵀ + b in place (out holds Os on entry); `states`
// holds the totals and operands.phi_k φ(K) (key_block_states). Returns
// nullptr, or why it cannot run (nothing launched): no sm_90a code in the
// build, too little shared memory, or a layout of v the tile copy engine
// cannot describe. weight (D, D) fp32 as (out, in), or null.
const char* linear_output_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                const TensorView& v, FeatureMap feature_map, LinearScope scope,
                                const KeyStates& states, const LinearSetOperands& operands, const float* weight,
                                const float* bias, const TensorView& out, const TensorView& out_linear,
                                cudaStream_t stream);

}  // namespace slattn::cuda
