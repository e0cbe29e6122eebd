// Quantization of the low-bit sparse branch's operands (sparse_quantized.h):
// one pass over K and V for their column statistics (partial sums of K,
// partial peaks of |V|, per chunk of keys: deterministic, no atomics), their
// totals per (batch, kv head) (mean(K), V's channel scales), then one thread
// block per block of rows: Q and K − mean(K) to INT8 with the block's step,
// V to e4m3 with its channel's scale, transposed so that the P V product
// reads it K-major. Each thread reads 8 consecutive channels of a row (one
// 16-byte load when rows are aligned). Rounding as the CPU path: to nearest,
// ties to even; INT8 clamped to ±127, e4m3 saturating.
#include "cuda/common.cuh"
#include "cuda/sparse_quantized.h"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVector = 8;  // channels a thread reads at once
constexpr float kInt8Max = 127.0f;
constexpr float kE4m3Max = 448.0f;

// Rows of a block a thread block's threads cover at once: kHeadDim / kVector threads per row.
template <int kHeadDim>
constexpr int rows_at_once() {
  return kThreads / (kHeadDim / kVector);
}

// Channels d0 .. d0 + 7 of row l of x.
template <typename Element>
__device__ __forceinline__ void load_vector(const DeviceView<const Element>& x, bool aligned, int64_t b, int64_t h,
                                            int64_t l, int d0, float (&out)[kVector]) {
  if (aligned) {
    const uint4 raw = *reinterpret_cast<const uint4*>(&x.at(b, h, l, d0));
    const Element* elements = reinterpret_cast<const Element*>(&raw);
#pragma unroll
    for (int i = 0; i < kVector; ++i) out[i] = to_float(elements[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVector; ++i) out[i] = x.load(b, h, l, d0 + i);
  }
}

// Channels d0 .. d0 + 7 of rows first, first + kStride, ... (kPasses rows;
// those from `len` on read row len − 1, for the caller to discard): every
// load is issued before the first conversion, so a thread waits for memory
// once, not once a row.
template <int kPasses, int kStride, typename Element>
__device__ __forceinline__ void load_rows(const DeviceView<const Element>& x, bool aligned, int64_t b, int64_t h,
                                          int64_t first, int64_t len, int d0, float (&out)[kPasses][kVector]) {
  if (!aligned) {
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass)
      load_vector(x, false, b, h, min(first + pass * kStride, len - 1), d0, out[pass]);
    return;
  }
  uint4 raw[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass)
    raw[pass] = *reinterpret_cast<const uint4*>(&x.at(b, h, min(first + pass * kStride, len - 1), d0));
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const Element* elements = reinterpret_cast<const Element*>(&raw[pass]);
#pragma unroll
    for (int i = 0; i < kVector; ++i) out[pass][i] = to_float(elements[i]);
  }
}

// The largest value of `x` over the thread block (every thread gets it).
__device__ float block_max(float x, float* scratch) {
  x = warp_max(x);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  float peak = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) peak = fmaxf(peak, scratch[w]);
  return peak;
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
  const int row_lane = threadIdx.x / (kHeadDim / kVector), d0 = threadIdx.x % (kHeadDim / kVector) * kVector;
  const bool k_aligned = rows_are_16_byte_aligned(k), v_aligned = rows_are_16_byte_aligned(v);
  float sum[kVector] = {}, peak[kVector] = {};
  const int64_t end = min(g.k_len, (chunk + 1) * kStatsChunkRows);
  for (int64_t l = chunk * kStatsChunkRows + row_lane; l < end; l += kRows) {
    float x[kVector];
    load_vector(k, k_aligned, b, h, l, d0, x);
#pragma unroll
    for (int i = 0; i < kVector; ++i) sum[i] += x[i];
    load_vector(v, v_aligned, b, h, l, d0, x);
#pragma unroll
    for (int i = 0; i < kVector; ++i) peak[i] = fmaxf(peak[i], fabsf(x[i]));
  }
#pragma unroll
  for (int i = 0; i < kVector; ++i) {
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

// Grid (kv pairs), a thread per channel: the chunks' statistics summed up,
// mean(K) and V's channel scale max |v_c| / 448, read by every block after.
template <int kHeadDim>
__global__ void __launch_bounds__(kHeadDim) column_totals_kernel(Geometry g, QuantizedOperands ops) {
  const int64_t chunks = QuantizedOperands::chunks(g), pair = blockIdx.x;
  const float* sums = ops.key_sums + pair * chunks * kHeadDim + threadIdx.x;
  const float* peaks = ops.value_peaks + pair * chunks * kHeadDim + threadIdx.x;
  float total = 0.0f, peak = 0.0f;
#pragma unroll 8
  for (int64_t c = 0; c < chunks; ++c) {
    total += sums[c * kHeadDim];
    peak = fmaxf(peak, peaks[c * kHeadDim]);
  }
  ops.key_means[pair * kHeadDim + threadIdx.x] = total / static_cast<float>(g.k_len);
  ops.v_scales[pair * kHeadDim + threadIdx.x] = peak / kE4m3Max;
}

// What one INT8 quantization writes: rows of `rows` per pair (zero past
// `len`), a step per block of rows; `means` (K: subtract mean(K)) or null (Q).
struct Int8Blocks {
  int64_t heads, len, blocks, rows;
  const float* means;
  int8_t* out;
  float* steps;
};

// Grid (blocks, heads, batch): x − mean over one block of kBlockRows rows to
// INT8 with the block's step max |x − mean| / 127. A thread keeps its rows of
// the block in registers between the peak and the rounding: x is read once.
template <typename Element, int kHeadDim, int kBlockRows>
__global__ void __launch_bounds__(kThreads) int8_blocks_kernel(TensorView x_view, Int8Blocks task) {
  constexpr int kRows = rows_at_once<kHeadDim>();
  static_assert(kBlockRows % kRows == 0, "a block's rows must split evenly over the passes");
  constexpr int kPasses = kBlockRows / kRows;
  __shared__ float scratch[kThreads / kWarpSize];
  const auto x = DeviceView<const Element>::of(x_view);
  const int64_t block = blockIdx.x, h = blockIdx.y, b = blockIdx.z, pair = b * task.heads + h;
  const int row_lane = threadIdx.x / (kHeadDim / kVector), d0 = threadIdx.x % (kHeadDim / kVector) * kVector;
  const bool aligned = rows_are_16_byte_aligned(x);
  const int64_t first = block * kBlockRows + row_lane;  // this thread's first row; its others kRows apart

  float values[kPasses][kVector];
  load_rows<kPasses, kRows>(x, aligned, b, h, first, task.len, d0, values);
  float mean[kVector] = {};
  if (task.means) {
#pragma unroll
    for (int i = 0; i < kVector; ++i) mean[i] = task.means[pair * kHeadDim + d0 + i];
  }
  float peak = 0.0f;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const bool real = first + pass * kRows < task.len;  // rows past the end quantize to 0 and leave the peak alone
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      values[pass][i] = real ? values[pass][i] - mean[i] : 0.0f;
      peak = fmaxf(peak, fabsf(values[pass][i]));
    }
  }
  const float step = block_max(peak, scratch) / kInt8Max;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      const float scaled = step > 0.0f ? values[pass][i] / step : 0.0f;
      const int integer = max(-127, min(127, __float2int_rn(scaled)));
      packed[i / 4] |= (static_cast<uint32_t>(integer) & 0xFFu) << (8 * (i % 4));
    }
    *reinterpret_cast<uint2*>(task.out + (pair * task.rows + first + pass * kRows) * kHeadDim + d0) =
        make_uint2(packed[0], packed[1]);
  }
  if (threadIdx.x == 0) task.steps[pair * task.blocks + block] = step;
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
  const int row_lane = threadIdx.x / (kHeadDim / kVector), d0 = threadIdx.x % (kHeadDim / kVector) * kVector;
  const bool aligned = rows_are_16_byte_aligned(v);
  if (threadIdx.x < kHeadDim) scale[threadIdx.x] = ops.v_scales[pair * kHeadDim + threadIdx.x];
  const int64_t first = block * kBlockK;
  static_assert(kBlockK % kRows == 0, "a block's rows must split evenly over the passes");
  constexpr int kPasses = kBlockK / kRows;
  float values[kPasses][kVector];
  load_rows<kPasses, kRows>(v, aligned, b, h, first + row_lane, g.k_len, d0, values);
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * kRows + row_lane;
#pragma unroll
    for (int i = 0; i < kVector; ++i)
      tile[r][d0 + i] = from_float<Element>(first + r < g.k_len ? values[pass][i] : 0.0f);
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

void quantize_operands(const Geometry& g, const TensorView& q, const TensorView& k, const TensorView& v,
                       const QuantizedOperands& ops, cudaStream_t stream) {
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, BK = decltype(block_k)::value;
    const auto kv_grid = [&](int64_t x) {
      return dim3(static_cast<unsigned>(x), static_cast<unsigned>(g.kv_heads), static_cast<unsigned>(g.batch));
    };
    column_stats_kernel<Element, D><<<kv_grid(QuantizedOperands::chunks(g)), kThreads, 0, stream>>>(g, k, v, ops);
    column_totals_kernel<D><<<static_cast<unsigned>(g.kv_pairs()), D, 0, stream>>>(g, ops);
    const Int8Blocks keys{g.kv_heads, g.k_len, g.k_blocks, g.k_rows(), ops.key_means, ops.k, ops.k_steps};
    int8_blocks_kernel<Element, D, BK><<<kv_grid(g.k_blocks), kThreads, 0, stream>>>(k, keys);
    e4m3_values_kernel<Element, D, BK><<<kv_grid(g.k_blocks), kThreads, 0, stream>>>(g, v, ops);
    const Int8Blocks queries{g.heads, g.q_len, g.q_blocks, g.q_rows(), nullptr, ops.q, ops.q_steps};
    const dim3 q_grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads),
                      static_cast<unsigned>(g.batch));
    int8_blocks_kernel<Element, D, BQ><<<q_grid, kThreads, 0, stream>>>(q, queries);
  });
  SLATTN_LAUNCH_CHECK("quantize_operands");
}

}  // namespace slattn::cuda
