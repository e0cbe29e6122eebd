// A strided, batched fp32 matrix product on CUDA cores: the dense pieces of
// the linear branch (key-block states, per-block outputs and their
// gradients) and the projection. Operands are addressed by (row, column,
// batch) strides, so a transpose is only a swap of strides.
//
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace slattn::cuda {

// One operand of every batch: a (rows x cols) matrix at data + batch * batch_stride.
struct GemmOperand {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 0, batch_stride = 0;
};

struct GemmOutput {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, batch_stride = 0;  // columns are contiguous
};

// C[b] = A[b] B[b] + beta C[b] for b < batches; the sizes come from the operands
// (A is m x k, B k x n, C m x n) and must agree.
void gemm(int64_t batches, const GemmOperand& a, const GemmOperand& b, const GemmOutput& c, cudaStream_t stream,
          float beta = 0.0f);

// A row-major (rows, cols) matrix per batch, batch stride rows * cols, or its transpose.
inline GemmOperand dense(const float* data, int64_t rows, int64_t cols, bool transposed = false) {
  return transposed ? GemmOperand{data, cols, rows, 1, cols, rows * cols}
                    : GemmOperand{data, rows, cols, cols, 1, rows * cols};
}

inline GemmOutput dense_out(float* data, int64_t rows, int64_t cols) { return {data, rows, cols, cols, rows * cols}; }

}  // namespace slattn::cuda
