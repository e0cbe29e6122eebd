// What the Hopper kernels of the linear branch (linear_forward_wgmma.h,
// linear_backward_wgmma.h) read: φ(Q) rows and their denominators φ(q)·Z_m + ε,
// every query block's H_m (a product of the linear set's indicator with the
// key-block states h_n, linear_set_states.h) and W in the input dtype, and
// the tensor maps the copy engine reads them through.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_states.h"
#include "cuda/tensor_map.h"
#include "cuda/workspace.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// The Hopper linear kernels run for the fixed feature maps on a Hopper GPU
// unless SLATTN_CUDA_MAINLOOP=mma asks for the sm_80 kernels.
bool use_hopper_linear(FeatureMap feature_map);

// Workspace of the Hopper linear kernels, in the input dtype where not said.
struct LinearSetOperands {
  void* phi_q = nullptr;         // (q pairs, Lq, D): φ(Q) (null without query rows, below)
  void* block_h = nullptr;       // h_n, written by key_block_states, padded as linear_set_states.h says
  float* set_z = nullptr;        // (q pairs * Mq, F) fp32: Z_m
  float* denominator = nullptr;  // (q pairs, Lq) fp32: φ(q)·Z_m + ε (likewise)
  void* indicator = nullptr;     // 1 where n is in U_m, padded as linear_set_states.h says
  int32_t* set_size = nullptr;   // (q pairs * Mq): |U_m|
  void* set_h = nullptr;         // (q pairs * Mq, D, D): H_m
  void* weight = nullptr;        // (D, D): the projection's W as (out, in)
  void* cublas_workspace = nullptr;

  // query_rows false: no φ(Q) rows and denominators (the sparse forward's linear epilogue forms its own).
  static LinearSetOperands carve(WorkspaceCarver& carver, const Geometry& g, DType dtype, bool query_rows = true);
};

// Fills set_z, indicator, set_size and set_h from `states` and block_h (after
// key_block_states), and weight from the fp32 W (out, in) when not null: what
// the sparse forward's linear epilogue reads (ForwardLinearTerms).
void prepare_linear_set_states(const Geometry& g, const RoutingPlanView& plan, DType dtype, LinearScope scope,
                               const KeyStates& states, const float* weight, const LinearSetOperands& operands,
                               cudaStream_t stream);

// prepare_linear_set_states, then phi_q and denominator from q (carved with query rows).
void prepare_linear_set_operands(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                 FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                 const float* weight, const LinearSetOperands& operands, cudaStream_t stream);

// dz_n = Σ over the query heads of the GQA group of Σ_{m: n in U_m} dZ_m (or
// the total less the others, as the key kernel lists them), per key block:
// dz_query (q pairs * Mq, F), dz_total (q pairs, F) -> dz_key (kv pairs * Nk, F).
void key_block_dz(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* dz_query,
                  const float* dz_total, float* dz_key, cudaStream_t stream);

// target[i] = source[i] rounded to `dtype` (bf16 or fp16).
void round_to_dtype(const float* source, void* target, DType dtype, int64_t count, cudaStream_t stream);


// A (batch, heads, length, dim) tensor stored densely in that order.
TensorView dense_rows(void* data, DType dtype, int64_t batch, int64_t heads, int64_t length, int64_t dim);

// The map of `count` dense D x D tiles in `dtype`, one after another (H_m, H_m Wᵀ, W), a box per tile;
// throws if the copy engine refuses it (the workspace's buffers suit it).
RowTileMap state_tiles_map(const void* tiles, DType dtype, int64_t count, int64_t dim);

struct LinearSetMaps {
  RowTileMap phi_q;  // boxes of block_q rows
  RowTileMap set_h;  // H_m as (1, q pairs * Mq, F, D): boxes of whole states
  RowTileMap w;
};

// The maps of `operands` (dtype: q's).
LinearSetMaps linear_set_maps(const Geometry& g, DType dtype, const LinearSetOperands& operands);

}  // namespace slattn::cuda
