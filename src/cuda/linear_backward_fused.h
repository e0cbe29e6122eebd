// The linear branch's backward for the fixed feature maps (SPEC section 5),
// fused like its forward (linear_forward_fused.h): the key-block states are
// recomputed, then one kernel per query block (Ol, G, c, dQ, dH_m, dZ_m) and
// one per key block (dh_n, dz_n, dK, dV), on Hopper linear_backward_wgmma.h's;
// no row of φ, V or G goes through global memory. Hedgehog, and devices
// whose shared memory is too small for the kernels (140 KB at 128-row blocks
// and D = 128), take the unfused path.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_backward_wgmma.h"
#include "cuda/linear_set_operands.h"
#include "cuda/linear_states.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

struct LinearGradBuffers {
  KeyStates keys;
  LinearSetOperands linear_set{};     // with the Hopper kernels (use_hopper_linear)
  LinearKeyGradOperands key_set{};    // likewise
  // (q pairs, q_rows, D): Ol rows for dW (with a projection), fp32 from the sm_80 query kernel, in the
  // input dtype (the buffer's first half) from the Hopper one.
  float* ol = nullptr;
  float* projection_partials = nullptr;  // projection_grads_wgmma's (with a projection, on Hopper)
  float* dol = nullptr;  // (q pairs, q_rows, D): dO W (with a projection)
  float* dh_query;       // (q pairs * Mq, F, D): dH_m for the sm_80 key kernel
  float* dz_query;       // (q pairs * Mq, F)
  float* dh_total;       // (q pairs, F, D)
  float* dz_total;       // (q pairs, F)

  static LinearGradBuffers carve(WorkspaceCarver& carver, const Geometry& g, bool projection, DType dtype,
                                 bool hopper);
};

bool fused_linear_backward_supported(const Geometry& g, FeatureMap feature_map);

// The linear branch's gradients in two halves around the sparse dK/dV kernel.
// The query side: dq = the sparse branch's dq_rows (padded fp32 rows) + the
// linear branch's, dH_m and dZ_m (and the key-block states, recomputed).
// dout_rows (fp32 rows of dO) and weight (D, D) are given with a projection,
// else null; dout (dO) is read with a projection; dout_linear may be
// undefined. With the Hopper kernels' buffers (buffers.linear_set carved) the
// caller leaves dout_rows unwritten: the Hopper kernels read dout itself, and
// they are written here only if an sm_80 kernel takes over. Returns whether
// the Hopper query kernel ran: the Ol rows are then in the input dtype, and
// dout_rows unwritten.
bool linear_backward_fused_queries(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                   const TensorView& k, const TensorView& v, FeatureMap feature_map, LinearScope scope,
                                   const LinearGradBuffers& buffers, const TensorView& dout, float* dout_rows,
                                   const float* weight, const TensorView& dout_linear, const float* dq_rows,
                                   const TensorView& dq, cudaStream_t stream);

// After the Hopper query kernel ran: the key side's terms (dh_n, dz_n) for the
// sparse dK/dV kernel to add into dk and dv.
KeyGradLinearTerms linear_backward_fused_key_terms(const Geometry& g, const RoutingPlanView& plan, DType dtype,
                                                   FeatureMap feature_map, LinearScope scope,
                                                   const LinearGradBuffers& buffers, const TensorView& dk,
                                                   const TensorView& dv, cudaStream_t stream);

// Otherwise the key side itself, after the sparse dK/dV kernel: dk, dv =
// dk_rows, dv_rows + the linear branch's. hopper_queries: what
// linear_backward_fused_queries returned.
void linear_backward_fused_keys(const Geometry& g, const RoutingPlanView& plan, const TensorView& k,
                                const TensorView& v, FeatureMap feature_map, LinearScope scope,
                                const LinearGradBuffers& buffers, bool hopper_queries, const float* dk_rows,
                                const float* dv_rows, const TensorView& dk, const TensorView& dv,
                                cudaStream_t stream);

}  // namespace slattn::cuda
