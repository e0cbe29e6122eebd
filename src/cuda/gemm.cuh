// A strided, batched fp32 matrix product on CUDA cores: the dense pieces of
// the linear branch (key-block states, per-block outputs and their
// gradients) and the projection. Operands are addressed by (row, column,
// batch) strides, so a transpose is only a swap of strides.
//
// C[b] = alpha * A[b] (m x k) * B[b] (k x n) + beta * C[b]
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slattn::cuda {

struct GemmOperand {
  const float* data = nullptr;
  int64_t row_stride = 0, col_stride = 0, batch_stride = 0;
};

struct GemmOutput {
  float* data = nullptr;
  int64_t row_stride = 0, batch_stride = 0;  // columns are contiguous
};

struct GemmArgs {
  int64_t m = 0, n = 0, k = 0, batches = 1;
  GemmOperand a, b;
  GemmOutput c;
  float alpha = 1.0f;
  float beta = 0.0f;  // 0: C is not read
};

void gemm(const GemmArgs& args, cudaStream_t stream);

// Row-major (rows, cols) operand of batch stride rows * cols, optionally transposed.
inline GemmOperand dense(const float* data, int64_t rows, int64_t cols, bool transposed = false) {
  return transposed ? GemmOperand{data, 1, cols, rows * cols} : GemmOperand{data, cols, 1, rows * cols};
}

inline GemmOutput dense_out(float* data, int64_t rows, int64_t cols) { return {data, cols, rows * cols}; }

}  // namespace slattn::cuda
