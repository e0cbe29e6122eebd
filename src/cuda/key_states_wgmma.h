// The key-block states of the linear branch on Hopper (sm_90a) for the fixed
// feature maps: h_n = φ(K_n)ᵀ V_n and z_n = Σ φ(k) per key block, with φ(K_n)
// rounded to the input dtype and h_n stored in it (what the Hopper linear
// kernels' sums read, linear_set_states.h), and the total Z = Σ_n z_n. One warp-specialised, persistent kernel: a producer warp
// copies K_n and V_n with the tile copy engine into three stages (two with W) while two
// consumer warpgroups (one for d = 64) form φ in place and multiply.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
#include "cuda/linear_states.h"
#include "slattn/options.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// Fills states.z and states.total_z (states.h and states.total_h, the fp32
// states of the sm_80 kernels, are not written), h_n into low_states (k's
// dtype, padded as linear_set_states.h says) and, when not null, φ(K) into
// phi_k ((kv pairs, Lk, F) dense, k's dtype). With `weight` (W (out, in) in
// k's dtype, block_k = D) it writes h_n Wᵀ in place of h_n: the states of the
// linear branch already projected (Ol Wᵀ = φ(Q) H_m Wᵀ / den). Returns nullptr,
// or why it cannot run (nothing launched): no sm_90a code, too little shared
// memory, or a layout of k or v the tile copy engine cannot read.
const char* key_block_states_wgmma(const Geometry& g, const TensorView& k, const TensorView& v, FeatureMap feature_map,
                                   const KeyStates& states, void* low_states, void* phi_k, cudaStream_t stream,
                                   const void* weight = nullptr);

}  // namespace slattn::cuda
