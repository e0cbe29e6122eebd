// The linear branch's forward for the fixed feature maps (softmax, elu, relu,
// whose φ keeps the width D), fused so that no row of φ, V or Ol goes through
// global memory: only the per-key-block states h_n, z_n and their totals do.
// Hedgehog (F = 2D, products with W) takes linear_forward (linear_states.h).
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_states.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

inline bool fused_linear_forward_supported(FeatureMap feature_map) { return !has_feature_weights(feature_map); }

// Fills `states` from k and v, and, in k's dtype, h_n into low_states
// ((kv pairs * Nk, F, D) dense) and φ(K) into phi_k ((kv pairs, Lk, F)
// dense) when not null.
void key_block_states(const Geometry& g, const TensorView& k, const TensorView& v, FeatureMap feature_map,
                      const KeyStates& states, void* low_states, void* phi_k, cudaStream_t stream);

// Per query block m: Ol = φ(Q_m) H_m / (φ(Q_m)·Z_m + ε) (0 where U_m is empty),
// written to out_linear when defined; with a projection, out = Os + Ol Wᵀ + b
// (Os read from `os`, which may be out). weight (D, D) fp32 as (out, in), or null.
void linear_output_fused(const Geometry& g, const RoutingPlanView& plan, const TensorView& q, FeatureMap feature_map,
                         LinearScope scope, const KeyStates& states, const float* weight, const float* bias,
                         const TensorView& os, const TensorView& out, const TensorView& out_linear,
                         cudaStream_t stream);

}  // namespace slattn::cuda
