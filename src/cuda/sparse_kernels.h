// The sparse branch on CUDA (SPEC sections 2 and 5): exact softmax attention
// over the critical key blocks with a FlashAttention-style online softmax, on
// tensor cores (sparse_forward_mma.cu, sparse_backward_mma.cu). Head dims 64
// and 128; block sizes 64 and 128.
#pragma once

#include <cuda_runtime.h>

#include <functional>
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

// The linear branch and the projection (the fixed feature maps, SPEC sections
// 3 and 4), which the Hopper forward can add itself in each query block's
// epilogue: out = Os + Ol Wᵀ + b with Ol Wᵀ = φ(Q_m) (H_m Wᵀ) / (φ(q)·Z_m + ε),
// φ(Q) formed from the query tile it copied. Os still goes to args.out_sparse
// when defined; args.out is not written.
struct ForwardLinearTerms {
  FeatureMap feature_map;
  const void* set_h;   // (q pairs * Mq, F, D), the input dtype: H_m Wᵀ
  const float* set_z;  // (q pairs * Mq, F): Z_m
  const float* bias;   // (D), or null
};

// Where the linear terms go (SLA's output), and how to prepare them: called
// once, before the Hopper forward's kernel, when that kernel can add them
// (a ring stage's key tile holds a D x D state: block_k = D, and the copy
// engine can write out); returns them, or null (the kernel then writes Os
// alone).
struct ForwardLinearStep {
  TensorView out;
  std::function<const ForwardLinearTerms*()> prepare;

  explicit operator bool() const { return static_cast<bool>(prepare); }
};

// Returns whether the kernel added `before`'s terms (out written as SLA's output).
bool sparse_forward(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                    cudaStream_t stream, const ForwardLinearStep& before = {});

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
  float* dk_rows;    // (written, unless the dK/dV kernel adds the linear terms below)
  float* dv_rows;    // likewise
};

// The linear branch's key-side terms (the fixed feature maps, SPEC section 5),
// which the Hopper dK/dV kernel can add itself before it stores dk and dv in
// their dtype (in place of its fp32 rows and a kernel of the linear branch's
// that adds them): per key block n, dV += φ(K_n) dh_n and dK += φ'(V_n dh_nᵀ +
// dz_n). Operands in the input dtype unless said.
struct KeyGradLinearTerms {
  FeatureMap feature_map;
  const void* phi_k;       // (kv pairs, Lk, F): φ(K)
  const void* dh_key;      // (kv pairs * dh_pair_tiles, F, D): dh_n
  int64_t dh_pair_tiles;   // dh_n tiles per kv pair
  const float* dz_key;     // (kv pairs * Nk, F) fp32: dz_n
  TensorView dk, dv;       // the final gradients
};

// Called once, after the dQ kernel (before the dK/dV kernel on Hopper, after
// it on the mma.sync path): the linear terms for the dK/dV kernel to add, or
// null. `can_add` says whether this dK/dV kernel can (the Hopper one, when
// its stages hold dh_n and φ(K_n)); when it cannot the call must return null
// (the caller adds them to the fp32 rows later).
using KeyGradLinearStep = std::function<const KeyGradLinearTerms*(bool can_add)>;

// Returns whether the dK/dV kernel added `between`'s terms (dk and dv stored; their rows not written).
bool sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream, const KeyGradLinearStep& between = {});

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
