// Quantization of K and V for the low-bit sparse branch (sparse_quantized.h):
// one pass over K and V for their column statistics (partial sums of K,
// partial peaks of |V|, per chunk of keys: deterministic, no atomics), then
// one thread block per key block: K − mean(K) to INT8 with the block's step,
// V to e4m3 with its channel's scale, transposed so that the P V product
// reads it K-major. Each thread reads 8 consecutive channels of a row (one
// 16-byte load when rows are aligned). Q is quantized by the forward itself.
#include "cuda/common.cuh"
#include "cuda/quantize.cuh"
#include "cuda/sparse_quantized.h"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kThreads = 256;

// Rows a thread block's threads cover at once: kHeadDim / kQuantizeVector threads per row.
template <int kHeadDim>
constexpr int rows_at_once() {
  return kThreads / (kHeadDim / kQuantizeVector);
}

// Grid (chunks, kv heads, batch): column sums of K and column peaks of |V| over one chunk of keys.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) column_stats_kernel(Geometry g, TensorView k_view, TensorView v_view,
                                                                QuantizedOperands ops) {
  constexpr int kRows = rows_at_once<kHeadDim>();
  __shared__ float sums[kRows][kHeadDim], peaks[kRows][kHeadDim];
  const auto k = DeviceView<const Element>::of(k_view);
  const auto v = DeviceView<const Element>::of(v_view);
  const int64_t chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int row_lane = threadIdx.x / (kHeadDim / kQuantizeVector);
  const int d0 = threadIdx.x % (kHeadDim / kQuantizeVector) * kQuantizeVector;
  const bool k_aligned = rows_are_16_byte_aligned(k), v_aligned = rows_are_16_byte_aligned(v);
  float sum[kQuantizeVector] = {}, peak[kQuantizeVector] = {};
  const int64_t end = min(g.k_len, (chunk + 1) * kStatsChunkRows);
  for (int64_t l = chunk * kStatsChunkRows + row_lane; l < end; l += kRows) {
    float x[kQuantizeVector];
    load_vector(k, k_aligned, b, h, l, d0, x);
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) sum[i] += x[i];
    load_vector(v, v_aligned, b, h, l, d0, x);
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) peak[i] = fmaxf(peak[i], fabsf(x[i]));
  }
#pragma unroll
  for (int i = 0; i < kQuantizeVector; ++i) {
    sums[row_lane][d0 + i] = sum[i];
    peaks[row_lane][d0 + i] = peak[i];
  }
  __syncthreads();
  if (threadIdx.x >= kHeadDim) return;
  float total = 0.0f, largest = 0.0f;
  for (int r = 0; r < kRows; ++r) {
    total += sums[r][threadIdx.x];
    largest = fmaxf(largest, peaks[r][threadIdx.x]);
  }
  const int64_t at = ((b * g.kv_heads + h) * QuantizedOperands::chunks(g) + chunk) * kHeadDim + threadIdx.x;
  ops.key_sums[at] = total;
  ops.value_peaks[at] = largest;
}

// Grid (key blocks, kv heads, batch): K − mean(K) over one block of keys to
// INT8 with the block's step max |k − mean| / 127 (rows past the sequence zero).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) int8_keys_kernel(Geometry g, TensorView k_view, QuantizedOperands ops) {
  constexpr int kRows = rows_at_once<kHeadDim>();
  __shared__ float mean[kHeadDim], scratch[kThreads / kWarpSize];
  const auto k = DeviceView<const Element>::of(k_view);
  const int64_t block = blockIdx.x, h = blockIdx.y, b = blockIdx.z, pair = b * g.kv_heads + h;
  const int row_lane = threadIdx.x / (kHeadDim / kQuantizeVector);
  const int d0 = threadIdx.x % (kHeadDim / kQuantizeVector) * kQuantizeVector;
  const bool aligned = rows_are_16_byte_aligned(k);
  if (threadIdx.x < kHeadDim) {
    const int64_t chunks = QuantizedOperands::chunks(g);
    float total = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) total += ops.key_sums[(pair * chunks + c) * kHeadDim + threadIdx.x];
    mean[threadIdx.x] = total / static_cast<float>(g.k_len);
  }
  __syncthreads();

  // Two reads of the block (the second from cache): holding it in registers instead measured slower.
  const int64_t first = block * g.block_k;
  float peak = 0.0f;
  for (int64_t r = row_lane; r < g.block_k && first + r < g.k_len; r += kRows) {
    float values[kQuantizeVector];
    load_vector(k, aligned, b, h, first + r, d0, values);
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) peak = fmaxf(peak, fabsf(values[i] - mean[d0 + i]));
  }
  const float step = block_max<kThreads>(peak, scratch) / kInt8Max;
  for (int64_t r = row_lane; r < g.block_k; r += kRows) {
    float values[kQuantizeVector] = {};
    if (first + r < g.k_len) {
      load_vector(k, aligned, b, h, first + r, d0, values);
#pragma unroll
      for (int i = 0; i < kQuantizeVector; ++i) values[i] -= mean[d0 + i];
    }
    *reinterpret_cast<uint2*>(ops.k + (pair * g.k_rows() + first + r) * kHeadDim + d0) = pack8_int8(values, step);
  }
  if (threadIdx.x == 0) ops.k_steps[pair * g.k_blocks + block] = step;
}

// Grid (key blocks, kv heads, batch): one block of V to e4m3 at its
// channels' scales, written transposed with each 32 keys in e4m3-fragment
// order (key_of_e4m3_fragment_column), through a shared tile.
template <typename Element, int kHeadDim, int kBlockK>
__global__ void __launch_bounds__(kThreads) e4m3_values_kernel(Geometry g, TensorView v_view, QuantizedOperands ops) {
  constexpr int kRows = rows_at_once<kHeadDim>();
  constexpr int kPad = 2;  // a row of 65 words: a column's reads fall on distinct banks
  __shared__ Element tile[kBlockK][kHeadDim + kPad];
  __shared__ float scale[kHeadDim];
  const auto v = DeviceView<const Element>::of(v_view);
  const int64_t block = blockIdx.x, h = blockIdx.y, b = blockIdx.z, pair = b * g.kv_heads + h;
  const int row_lane = threadIdx.x / (kHeadDim / kQuantizeVector);
  const int d0 = threadIdx.x % (kHeadDim / kQuantizeVector) * kQuantizeVector;
  const bool aligned = rows_are_16_byte_aligned(v);
  if (threadIdx.x < kHeadDim) {
    const int64_t chunks = QuantizedOperands::chunks(g);
    float peak = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) peak = fmaxf(peak, ops.value_peaks[(pair * chunks + c) * kHeadDim + threadIdx.x]);
    scale[threadIdx.x] = peak / kE4m3Max;
    if (block == 0) ops.v_scales[pair * kHeadDim + threadIdx.x] = peak / kE4m3Max;
  }
  const int64_t first = block * kBlockK;
  for (int r = row_lane; r < kBlockK; r += kRows) {
    float values[kQuantizeVector] = {};
    if (first + r < g.k_len) load_vector(v, aligned, b, h, first + r, d0, values);
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) tile[r][d0 + i] = from_float<Element>(values[i]);
  }
  __syncthreads();
  constexpr int kWordsPerChannel = kBlockK / 4;
  for (int i = threadIdx.x; i < kHeadDim * kWordsPerChannel; i += kThreads) {
    const int d = i / kWordsPerChannel, column0 = i % kWordsPerChannel * 4;
    float values[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int column = column0 + e;
      const int key = (column & ~31) + key_of_e4m3_fragment_column(column & 31);
      values[e] = scale[d] > 0.0f ? to_float(tile[key][d]) / scale[d] : 0.0f;
    }
    *reinterpret_cast<uint32_t*>(ops.v + (pair * kHeadDim + d) * g.k_rows() + first + column0) =
        pack4_e4m3(values[0], values[1], values[2], values[3]);
  }
}

}  // namespace

void quantize_keys_and_values(const Geometry& g, const TensorView& k, const TensorView& v,
                              const QuantizedOperands& ops, cudaStream_t stream) {
  dispatch_sparse_kernel(k.dtype, g, [&](auto tag, auto head_dim, auto, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BK = decltype(block_k)::value;
    const auto grid = [&](int64_t x) {
      return dim3(static_cast<unsigned>(x), static_cast<unsigned>(g.kv_heads), static_cast<unsigned>(g.batch));
    };
    column_stats_kernel<Element, D><<<grid(QuantizedOperands::chunks(g)), kThreads, 0, stream>>>(g, k, v, ops);
    int8_keys_kernel<Element, D><<<grid(g.k_blocks), kThreads, 0, stream>>>(g, k, ops);
    e4m3_values_kernel<Element, D, BK><<<grid(g.k_blocks), kThreads, 0, stream>>>(g, v, ops);
  });
  SLATTN_LAUNCH_CHECK("quantize_keys_and_values");
}

}  // namespace slattn::cuda
