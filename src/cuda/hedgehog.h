// The learnable hedgehog feature map on CUDA (SPEC sections 3 and 5):
// φ(x) = softmax([x Wᵀ, −x Wᵀ]) over F = 2D, W (D, D) fp32 as (out, in).
// Rows use the padded fp32 layouts of geometry.h; the products with W go
// through gemm() over all rows of all (batch, head) pairs at once, since one
// W serves every head.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "slattn/tensor_view.h"

namespace slattn::cuda {

// x_rows = x (pairs, rows_padded, D) and phi = φ(x) (pairs, rows_padded, 2D);
// pad rows of both are zero.
void hedgehog_rows(const TensorView& x, int64_t rows_padded, const float* weight, float* x_rows, float* phi,
                   cudaStream_t stream);

// Partial sums hedgehog_input_grads writes for `rows` rows: one (D, D) matrix each.
int64_t hedgehog_weight_chunks(int64_t rows);

// The products after the row kernels left d(pre) = d(x Wᵀ) in the first D
// columns of each of `rows` rows, 2D apart (linear_{query,key}_grad):
//   dx_rows (rows, D) += d(pre) W,
//   dw_partial (hedgehog_weight_chunks(rows), D, D) = Σ over each chunk of rows of d(pre)ᵀ x.
void hedgehog_input_grads(int64_t rows, int64_t dim, const float* d_pre, const float* x_rows, const float* weight,
                          float* dx_rows, float* dw_partial, cudaStream_t stream);

}  // namespace slattn::cuda
