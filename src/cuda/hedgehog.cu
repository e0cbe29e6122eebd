#include "cuda/gemm.cuh"
#include "cuda/hedgehog.h"
#include "cuda/linear_kernels.h"
#include "cuda/row_ops.cuh"

namespace slattn::cuda {
namespace {

// Rows per partial product of dW: enough that each product fills the GPU
// with long k loops, few enough that the partials stay small.
constexpr int64_t kChunkRows = 2048;

// phi rows hold pre = x Wᵀ in their first D columns (from the product);
// each becomes softmax([pre, −pre]) over 2D. Pad rows become zero.
__global__ void hedgehog_softmax_kernel(float* phi, int64_t length, int64_t rows_padded, int64_t dim, int64_t pairs) {
  RowIndex at;
  if (!RowIndex::of(pairs, rows_padded, at)) return;
  float* row = phi + (at.pair * rows_padded + at.row) * 2 * dim;
  if (at.row >= length) {
    WarpRow{}.store(row, 2 * dim);
    return;
  }
  // [pre, −pre] read from memory: entry i of the second half is pre[i − D],
  // a register slot the compiler could not index at run time.
  WarpRow both;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int i = WarpRow::index(t);
    both.v[t] = i < dim ? row[i] : i < 2 * dim ? -row[i - dim] : 0.0f;
  }
  __syncwarp();  // every lane has read pre before any overwrites it
  feature_map_row(FeatureMap::softmax, both, 2 * dim).store(row, 2 * dim);
}

}  // namespace

void hedgehog_rows(const TensorView& x, int64_t rows_padded, const float* weight, float* x_rows, float* phi,
                   cudaStream_t stream) {
  const int64_t pairs = x.batch() * x.heads(), rows = pairs * rows_padded, dim = x.head_dim();
  SLATTN_CHECK(2 * dim <= kMaxPerLane * kWarpSize, "hedgehog_rows: 2 x head_dim ", 2 * dim,
               " exceeds a warp row of ", kMaxPerLane * kWarpSize);
  feature_rows(x, rows_padded, FeatureMap::softmax, nullptr, x_rows, stream);  // x only: no map applied
  // pre = x Wᵀ into the first half of each φ row (rows 2D apart).
  gemm(1, dense(x_rows, rows, dim), dense(weight, dim, dim, /*transposed=*/true),
       GemmOutput{phi, rows, dim, 2 * dim, 0}, stream);
  hedgehog_softmax_kernel<<<row_blocks(rows), kRowThreads, 0, stream>>>(phi, x.length(), rows_padded, dim, pairs);
  SLATTN_LAUNCH_CHECK("hedgehog_softmax_kernel");
}

int64_t hedgehog_weight_chunks(int64_t rows) { return ceil_div(rows, kChunkRows); }

void hedgehog_input_grads(int64_t rows, int64_t dim, const float* d_pre, const float* x_rows, const float* weight,
                          float* dx_rows, float* dw_partial, cudaStream_t stream) {
  const int64_t features = 2 * dim;
  // dx += d(pre) W (pre = x Wᵀ, so d(pre)/dx is W itself).
  gemm(1, GemmOperand{d_pre, rows, dim, features, 1, 0}, dense(weight, dim, dim),
       GemmOutput{dx_rows, rows, dim, dim, 0}, stream, /*beta=*/1.0f);
  // dW = Σ d(pre)ᵀ x: the full chunks as one batched product, the rest as one
  // more, each into its own partial; the caller sums them in order.
  auto chunk_products = [&](int64_t batches, int64_t first_row, int64_t chunk_rows, float* out) {
    const GemmOperand d_pre_t{d_pre + first_row * features, dim, chunk_rows, 1, features, chunk_rows * features};
    const GemmOperand x{x_rows + first_row * dim, chunk_rows, dim, dim, 1, chunk_rows * dim};
    gemm(batches, d_pre_t, x, dense_out(out, dim, dim), stream);
  };
  const int64_t full = rows / kChunkRows, rest = rows % kChunkRows;
  if (full > 0) chunk_products(full, 0, kChunkRows, dw_partial);
  if (rest > 0) chunk_products(1, full * kChunkRows, rest, dw_partial + full * dim * dim);
}

}  // namespace slattn::cuda
