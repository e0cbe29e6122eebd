// The linear branch's per-block sums as matrix products on Hopper. With I the
// linear set's indicator (I[m, n] = 1 where key block n is in U_m, SPEC
// section 3), every query block's state and every key block's state gradient
// are products of I with the per-block tiles, each D x D tile taken as a row
// of F·D numbers:
//   H_m  = Σ_n I[m, n] h_n                          (forward, query gradients)
//   dh_n = Σ over the GQA group's heads Σ_m I[m, n] dH_m   (key gradients)
// One cuBLAS product per (batch, kv head) does what a walk over each block's
// listed tiles did: a walk read some topk · Nk tiles of 32 KB per block from
// L2 (1.4 GB a pass at the Wan2.1-1.3B shape, 23 GB at 14B); the product
// reads each tile a few times and runs on the tensor cores, with fp32 sums
// rounded once to the input dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/geometry.h"
#include "slattn/options.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// The workspace cuBLAS is given for its products (it allocates none of its own, so capture in a CUDA graph
// works).
inline constexpr size_t kCublasWorkspaceBytes = size_t{4} << 20;

// The indicator's row stride: Nk rounded up to whole 16-byte units (zeros after Nk). cuBLAS's fast
// kernels need such leading dimensions; at Nk = 591 (the Wan2.1-14B shape) it fell back to kernels 5x slower.
inline int64_t indicator_stride(const Geometry& g) { return (g.k_blocks + 7) / 8 * 8; }

// indicator (q pairs, Mq, indicator_stride) in `dtype`: 1 where key block n is in U_m, else 0; set_size
// (q pairs * Mq): |U_m|.
void linear_set_indicator(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, DType dtype,
                          void* indicator, int32_t* set_size, cudaStream_t stream);

// set_h (q pairs * Mq, F, D) = H_m from block_h (kv pairs * Nk, F, D), both in `dtype`.
void sum_set_states(const Geometry& g, DType dtype, const void* indicator, const void* block_h, void* set_h,
                    void* cublas_workspace, cudaStream_t stream);

// dh_key (kv pairs * Nk, F, D) = dh_n from dh_query (q pairs * Mq, F, D) = dH_m, both in `dtype`.
void sum_key_set_grads(const Geometry& g, DType dtype, const void* indicator, const void* dh_query, void* dh_key,
                       void* cublas_workspace, cudaStream_t stream);

}  // namespace slattn::cuda
