// The projection's gradients on Hopper (sm_90a), for the fused linear
// backward: dW = Σ dOᵀ Ol and db = Σ dO over every query row of every
// (batch, head) pair, from dO (the caller's tensor) and the Ol rows the
// Hopper query kernel wrote in the input dtype (linear_backward_wgmma.h).
// One warp-specialised, persistent kernel: a producer warp copies dO_m and
// Ol_m of each query block into three stages; a consumer warpgroup per 64
// output features accumulates its rows of dW over the thread block's query
// blocks on warpgroup products (fp32), and the consumers sum db's columns
// from the dO tiles. Each thread block writes one partial; the partials are
// then summed in order (deterministic).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/geometry.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// fp32 elements of the partials' workspace at this geometry.
int64_t projection_grad_partial_floats(const Geometry& g);

// d_weight (D, D) fp32 as (out, in) and, when not null, d_bias (D) fp32, from
// dout (B, H, Lq, D) and ol_low ((q pairs, q_rows, D) dense, dout's dtype,
// rows past the sequence zero). Throws when it cannot run: it runs wherever
// linear_query_grads_wgmma ran with a projection.
void projection_grads_wgmma(const Geometry& g, const TensorView& dout, const void* ol_low, float* partials,
                            float* d_weight, float* d_bias, cudaStream_t stream);

}  // namespace slattn::cuda
