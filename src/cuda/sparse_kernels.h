// The sparse branch on CUDA (SPEC sections 2 and 5): exact softmax attention
// over the critical key blocks with a FlashAttention-style online softmax, on
// tensor cores (sparse_forward_mma.cu, sparse_backward_mma.cu). Head dims 64
// and 128; block sizes 64 and 128.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/geometry.h"
#include "cuda/sla_cuda.h"
#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

struct SparseForwardArgs {
  TensorView q, k, v;
  TensorView out;         // written when defined (no projection: out = Os)
  TensorView out_sparse;  // written when defined
  float* os_rows;         // padded fp32 Os rows, written when not null
  float* lse;             // (B, Hq, Lq)
  float scale;
};
void sparse_forward(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                    cudaStream_t stream);

struct SparseBackwardArgs {
  TensorView q, k, v;
  TensorView out_sparse;   // Os
  TensorView dout;
  TensorView dout_sparse;  // optional
  const float* lse;
  float scale;
  // Workspace, padded rows: dOs in the input dtype (the products' operand), the rest fp32.
  void* dos_rows;    // dOs = dout + dout_sparse (written, unless the Hopper kernels read dout itself)
  float* dout_rows;  // dout alone (written when not null)
  float* delta;      // D_i per padded query row (written)
  float* lse_log2_rows;  // LSE · log2(e) per padded query row, +inf on pad rows (written)
  float* dq_rows;    // (written)
  float* dk_rows;    // (written)
  float* dv_rows;    // (written)
};
void sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream);

// The first step of sparse_backward: dos_rows (when not null), dout_rows (likewise) and delta.
void sparse_delta(const Geometry& g, const SparseBackwardArgs& args, cudaStream_t stream);

// The head dims and block sizes the sparse kernels are built for.
void check_sparse_support(const Geometry& g);

// check_sparse_support, and the fp32 projection and feature weights the CUDA path takes.
void check_cuda_support(const Geometry& g, const void* proj_weight, DType proj_dtype, FeatureMap feature_map,
                        const FeatureWeights& feature_weights);

// Calls fn(Element{}, D, BQ, BK), the last three as std::integral_constant,
// for `dtype` and the head dim and block sizes of g (after
// check_sparse_support): the one dispatch of the kernels built per shape.
template <typename Fn>
void dispatch_sparse_kernel(DType dtype, const Geometry& g, Fn&& fn) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  dispatch_element(dtype, [&](auto tag) {
    auto by_block_k = [&](auto head_dim, auto block_q) {
      if (g.block_k == 64) return fn(tag, head_dim, block_q, D64{});
      return fn(tag, head_dim, block_q, D128{});
    };
    auto by_block_q = [&](auto head_dim) {
      if (g.block_q == 64) return by_block_k(head_dim, D64{});
      return by_block_k(head_dim, D128{});
    };
    if (g.dim == 64) return by_block_q(D64{});
    return by_block_q(D128{});
  });
}

}  // namespace slattn::cuda
