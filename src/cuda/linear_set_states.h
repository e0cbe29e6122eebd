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

// cuBLAS runs these products on its fast (TMA) kernels only when the indicator's dimensions are multiples
// of 8: at Nk = 591 (the Wan2.1-14B shape) it fell back to kernels 5x slower. So the operands are laid out
// per (batch, kv head) with those dimensions padded to a multiple of 8, the padding zero:
//   the indicator as (kv pairs, set_rows_padded, key_blocks_padded): row member * Mq + m of a pair is
//   query block m of the group's query head `member`;
//   h_n and dh_n as (kv pairs, key_blocks_padded, F, D), dH_m as (kv pairs, set_rows_padded, F, D).
// H_m comes out dense: (q pairs * Mq, F, D).
inline int64_t padded_to_8(int64_t count) { return (count + 7) / 8 * 8; }
inline int64_t key_blocks_padded(const Geometry& g) { return padded_to_8(g.k_blocks); }
inline int64_t set_rows_padded(const Geometry& g) { return padded_to_8(g.group() * g.q_blocks); }

// The indicator in `dtype` (1 where key block n is in U_m, else 0; zero padding), and set_size
// (q pairs * Mq): |U_m|.
void linear_set_indicator(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, DType dtype,
                          void* indicator, int32_t* set_size, cudaStream_t stream);

// set_h = H_m from block_h = h_n, both in `dtype`; zeroes block_h's padding first.
void sum_set_states(const Geometry& g, DType dtype, const void* indicator, void* block_h, void* set_h,
                    void* cublas_workspace, cudaStream_t stream);

// dh_key = dh_n from dh_query = dH_m, both in `dtype`; zeroes dh_query's padding first.
void sum_key_set_grads(const Geometry& g, DType dtype, const void* indicator, void* dh_query, void* dh_key,
                       void* cublas_workspace, cudaStream_t stream);

}  // namespace slattn::cuda
