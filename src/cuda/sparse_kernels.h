// The sparse branch on CUDA (SPEC sections 2 and 5): exact softmax attention
// over the critical key blocks, FlashAttention-style online softmax, on CUDA
// cores. Head dims 64 and 128; block sizes 64 and 128.
#pragma once

#include <cuda_runtime.h>

#include "cuda/geometry.h"
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
  // Workspace, padded fp32 rows.
  float* dos_rows;   // dOs = dout + dout_sparse (written)
  float* dout_rows;  // dout alone (written when not null)
  float* delta;      // D_i per padded query row (written)
  float* dq_rows;    // (written)
  float* dk_rows;    // (written)
  float* dv_rows;    // (written)
};
void sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream);

// The head dims and block sizes the sparse kernels are built for.
void check_sparse_support(const Geometry& g);

}  // namespace slattn::cuda
