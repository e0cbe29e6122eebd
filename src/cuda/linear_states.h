// Forward pieces of the linear branch shared by the CUDA forward and backward:
// key-block states, their totals, the per-query-block states and Ol.
#pragma once

#include "cuda/geometry.h"
#include "cuda/linear_kernels.h"
#include "cuda/workspace.h"
#include "slattn/params.h"

namespace slattn::cuda {

// h_n = φ(K_n)ᵀ V_n (F x D) and z_n = Σ_{j in n} φ(k_j) for every key block,
// and their totals over the blocks of each (batch, kv head) pair.
struct KeyStates {
  float* h;        // (kv pairs * Nk, F, D)
  float* z;        // (kv pairs * Nk, F)
  float* total_h;  // (kv pairs, F, D)
  float* total_z;  // (kv pairs, F)

  static KeyStates carve(WorkspaceCarver& carver, const Geometry& g);
};

struct LinearBuffers {
  float* k_in = nullptr;  // (kv pairs, k_rows, D): k as fp32 rows; hedgehog only (its products read them)
  float* q_in = nullptr;  // (q pairs, q_rows, D): likewise q
  float* phi_k;    // (kv pairs, k_rows, F)
  float* v_rows;   // (kv pairs, k_rows, D)
  KeyStates keys;
  float* phi_q;    // (q pairs, q_rows, F)
  QueryStates query;
  float* ol;       // (q pairs, q_rows, D)

  static LinearBuffers carve(WorkspaceCarver& carver, const Geometry& g, FeatureMap feature_map);
};

// Fills every buffer; ol ends as the linear-branch output (0 where U_m is
// empty, and on pad rows); out_linear is written when defined. feature_weights
// holds hedgehog's fp32 W_q and W_k (unused by the fixed maps).
void linear_forward(const Geometry& g, const RoutingPlanView& plan, const TensorView& q, const TensorView& k,
                    const TensorView& v, FeatureMap feature_map, const FeatureWeights& feature_weights,
                    LinearScope scope, const LinearBuffers& buffers, const TensorView& out_linear,
                    cudaStream_t stream);

}  // namespace slattn::cuda
