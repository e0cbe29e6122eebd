// The linear branch's forward on Hopper (sm_90a) for the fixed feature maps.
// With the totals H = Σ_n h_n and Z = Σ_n z_n, the numerator and
// denominator of Ol (SPEC section 3) are either sums over the key blocks of
// U_m or the totals' minus the blocks outside U_m, whichever list is shorter:
//   φ(Q_m) H_m = Σ_{n in U_m} φ(Q_m) h_n  or  φ(Q_m) H − Σ_{n not in U_m} φ(Q_m) h_n,
// and likewise φ(q_i)·Z_m. For the default marginal scope the blocks outside
// U_m are the critical ones. Each φ(Q_m) h_n is one warpgroup product with
// h_n in the input dtype, and the products of a query block accumulate with
// no dependence between them (linear_forward_wgmma.cu); the output gets
// Ol Wᵀ + b in the kernel's epilogue. φ(Q), h_n, H and W are rounded to the
// input dtype for the products (fp32 accumulation); the denominators are
// taken in fp32.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_set_operands.h"
#include "cuda/linear_states.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// Ol of every query block (written to out_linear when defined) and, with a
// projection, out = Os + Ol Wᵀ + b (Os read from `os`, which may be out); `states`
// holds z_n and the totals, operands.block_h h_n (key_block_states); the
// other operands are prepared here. Returns nullptr, or why it cannot run
// (nothing launched): no sm_90a code in the build, or too little shared
// memory. weight (D, D) fp32 as (out, in), or null.
const char* linear_output_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                FeatureMap feature_map, LinearScope scope,
                                const KeyStates& states, const LinearSetOperands& operands, const float* weight,
                                const float* bias, const TensorView& os, const TensorView& out,
                                const TensorView& out_linear, cudaStream_t stream);

}  // namespace slattn::cuda
