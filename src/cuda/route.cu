// Pooled router of SLA on the GPU (SPEC section 1), bit-identical to the CPU
// router: both use the arithmetic of route_math.h. Its stages, in order:
//   1. block_sums_kernel: fp64 sums of the rows of every block of Q and of K;
//   2. key_mean_kernel: the mean of K over all rows, from the block sums;
//   3. block_means_kernel: q̄ and k̄ of every block, once, in place of the
//      sums, with fp32 copies and norm bounds for the approximate scores;
//   4. approximate scores on tensor cores (route_scores.cu);
//   5. classes and row lists, exact scores where the approximate ones cannot
//      decide (route_classify.cu; route_stages.cuh says why);
//   6. column_lists_kernel: the column lists, from the block map.
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/route_stages.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/workspace.h"
#include "route_math.h"

namespace slattn::cuda {
namespace {

namespace rm = route_math;

// Upper bound on key blocks per row: a row's state lives in shared memory.
constexpr int64_t kMaxKeyBlocks = 4096;
constexpr int kChannelsPerThread = 4;  // block sums: one 8-byte load of bf16 / fp16 per row
constexpr int kSumThreads = 256;
constexpr int kMeansThreads = 256;  // block means: a warp per block
constexpr int kListWarps = 4;       // column lists: a warp per column
constexpr int kKeyMeanThreads = 1024;
constexpr int kKeyMeanStaged = 4096;  // block sums (doubles) a pass of key_mean_kernel stages: 32 KB
constexpr unsigned kAllLanes = 0xffffffffu;
constexpr uintptr_t kWorkspaceAlignment = 16;  // the approximate scores copy 16-byte runs of their operands
// Norms are computed in fp64 to within 2^-44 (D <= 256); this factor makes them upper bounds.
constexpr double kNormSlack = 1.0 + 0x1p-40;

struct RouteBuffers {
  double* q_means;    // (B, Hq, Mq, D): block sums of Q, then q̄ in their place
  double* k_means;    // (B, Hkv, Nk, D): block sums of K, then k̄ in their place
  double* k_mean;     // (B, Hkv, D): the mean of K over all rows
  float* q_approx;    // (B, Hq, Mq, D): q̄ in fp32
  float* k_approx;    // (B, Hkv, Nk, D): k̄ in fp32
  float* q_norms;     // (B, Hq, Mq): at least |q̄_m|
  float* k_norm_max;  // (B, Hkv): at least max_n |k̄_n|
  float* scores;      // (B, Hq, Mq, Nk): approximate scores

  static RouteBuffers carve(WorkspaceCarver& carver, const RouteParams& p, const PlanShape& s) {
    const int64_t dim = p.q.head_dim();
    const int64_t q_rows = s.rows(), k_rows = s.batch * p.k.heads() * s.k_blocks();
    return {carver.take<double>(q_rows * dim),
            carver.take<double>(k_rows * dim),
            carver.take<double>(s.batch * p.k.heads() * dim),
            carver.take<float>(q_rows * dim),
            carver.take<float>(k_rows * dim),
            carver.take<float>(q_rows),
            carver.take<float>(s.batch * p.k.heads()),
            carver.take<float>(q_rows * s.k_blocks())};
  }
};

// The blocks of one input as block_sums_kernel walks them.
template <typename Element>
struct SumSource {
  DeviceView<const Element> x;
  int64_t heads, length, block, blocks;
  double* sums;     // (B, heads, blocks, D)
  bool vectorized;  // kChannelsPerThread channels are one aligned load
};

template <typename Element>
struct BlockSumsArgs {
  SumSource<Element> q, k;
  int64_t q_units, units;  // (b, h, block) units of Q, and of Q and K together
  int64_t lanes;           // threads per unit
  int64_t dim;
};

template <typename Element>
__device__ __forceinline__ void load_channels(const SumSource<Element>& s, int64_t b, int64_t h, int64_t r,
                                              int64_t c0, float (&x)[kChannelsPerThread]) {
  const Element* first = &s.x.at(b, h, r, c0);
  if (s.vectorized) {
    Element elements[kChannelsPerThread];
    const uint2 bits = *reinterpret_cast<const uint2*>(first);
    static_assert(sizeof(bits) == sizeof(elements));
    memcpy(elements, &bits, sizeof(bits));
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) x[i] = to_float(elements[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) x[i] = to_float(first[i * s.x.stride_d]);
  }
}

// One thread per (input, b, h, block, kChannelsPerThread channels), threads of
// a unit adjacent so that a warp reads whole rows: sums of the block's rows,
// added in order.
template <typename Element>
__global__ void __launch_bounds__(kSumThreads) block_sums_kernel(const __grid_constant__ BlockSumsArgs<Element> a) {
  const int64_t thread = blockIdx.x * int64_t{kSumThreads} + threadIdx.x;
  const int64_t unit = thread / a.lanes;
  if (unit >= a.units) return;
  const bool is_q = unit < a.q_units;
  const SumSource<Element>& s = is_q ? a.q : a.k;
  const int64_t index = is_q ? unit : unit - a.q_units;  // (b * heads + h) * blocks + n
  const int64_t n = index % s.blocks, h = index / s.blocks % s.heads, b = index / s.blocks / s.heads;
  const int64_t c0 = thread % a.lanes * kChannelsPerThread;
  double sums[kChannelsPerThread] = {};
  const int64_t end = min(s.length, (n + 1) * s.block);
#pragma unroll 4
  for (int64_t r = n * s.block; r < end; ++r) {
    float x[kChannelsPerThread];
    load_channels(s, b, h, r, c0, x);
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) sums[i] = rm::add(sums[i], static_cast<double>(x[i]));
  }
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) s.sums[index * a.dim + c0 + i] = sums[i];
}

// grid (kv heads, batch): the mean of K over all rows, as the sum of its
// block sums in order, one thread per channel; the block's threads first
// stage a pass of kKeyMeanStaged sums in shared memory together (one
// dependent load per block sum kept 12 thread blocks waiting on memory).
// Also clears the norm maximum that block_means_kernel gathers.
__global__ void __launch_bounds__(kKeyMeanThreads)
    key_mean_kernel(const double* k_sums, int64_t k_blocks, int64_t k_len, int64_t dim, double* k_mean,
                    float* k_norm_max) {
  __shared__ double staged[kKeyMeanStaged];
  const int64_t pair = blockIdx.y * gridDim.x + blockIdx.x;
  const double* sums = k_sums + pair * k_blocks * dim;
  const int64_t total = k_blocks * dim, pass = kKeyMeanStaged / dim * dim;
  const int c = threadIdx.x;
  double sum = 0.0;
  for (int64_t first = 0; first < total; first += pass) {
    const int64_t count = min(pass, total - first);
    for (int64_t i = threadIdx.x; i < count; i += kKeyMeanThreads) staged[i] = sums[first + i];
    __syncthreads();
    if (c < dim)
      for (int64_t i = c; i < count; i += dim) sum = rm::add(sum, staged[i]);
    __syncthreads();
  }
  if (c < dim) k_mean[pair * dim + c] = rm::div(sum, static_cast<double>(k_len));
  if (c == 0) k_norm_max[pair] = 0.0f;
}

struct MeansArgs {
  RouteBuffers buffers;
  int64_t q_rows, k_rows;  // blocks of Q (B Hq Mq) and of K (B Hkv Nk)
  int64_t q_blocks, k_blocks, q_len, k_len, block_q, block_k, dim;
};

// One warp per block: q̄ = sums / count or k̄ = sums / count - mean of K, in
// place of the sums (as route_math.h computes them), their fp32 copies, and
// bounds on their norms (per query block; the maximum over a head's key blocks).
__global__ void __launch_bounds__(kMeansThreads) block_means_kernel(const __grid_constant__ MeansArgs a) {
  const int64_t row = (blockIdx.x * int64_t{kMeansThreads} + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= a.q_rows + a.k_rows) return;
  const RouteBuffers& w = a.buffers;
  const bool is_q = row < a.q_rows;
  const int64_t index = is_q ? row : row - a.q_rows;
  const int64_t blocks = is_q ? a.q_blocks : a.k_blocks, block = is_q ? a.block_q : a.block_k;
  const int64_t n = index % blocks, pair = index / blocks;
  const int64_t count = min(is_q ? a.q_len : a.k_len, (n + 1) * block) - n * block;
  double* means = (is_q ? w.q_means : w.k_means) + index * a.dim;
  float* approx = (is_q ? w.q_approx : w.k_approx) + index * a.dim;
  double square_sum = 0.0;
  for (int64_t c = lane; c < a.dim; c += kWarpSize) {
    const double mean = is_q ? rm::div(means[c], static_cast<double>(count))
                             : rm::smoothed_key_mean(means[c], count, w.k_mean[pair * a.dim + c]);
    means[c] = mean;
    approx[c] = static_cast<float>(mean);
    square_sum += mean * mean;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    square_sum += __shfl_xor_sync(kAllLanes, square_sum, offset);
  if (lane != 0) return;
  const float norm = __double2float_ru(sqrt(square_sum) * kNormSlack);  // NaN stays NaN: the row's bound fails
  if (is_q) {
    w.q_norms[index] = norm;
  } else {  // non-negative floats (and NaN above them) order as their bits
    atomicMax(reinterpret_cast<unsigned*>(w.k_norm_max) + pair, __float_as_uint(norm));
  }
}

// One thread per query-block row: the sorted row list, and a check of the values.
__global__ void row_lists_kernel(const int8_t* block_map, int64_t rows, int64_t k_blocks, int32_t* row_count,
                                 int32_t* row_index, int* invalid) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= rows) return;
  const int8_t* map = block_map + row * k_blocks;
  int32_t* list = row_index + row * k_blocks;
  int32_t count = 0;
  for (int64_t n = 0; n < k_blocks; ++n) {
    const int8_t cls = map[n];
    if (cls < kNegligible || cls > kCritical) atomicExch(invalid, 1);
    if (cls == kCritical) list[count++] = static_cast<int32_t>(n);
  }
  row_count[row] = count;
  for (int64_t i = count; i < k_blocks; ++i) list[i] = -1;
}

// One warp per key-block column: walks the query blocks in order, 32 at a
// time, placing the critical ones by ballot; then pads the list with -1.
// (Neighbouring warps read neighbouring bytes of the same block-map rows.)
__global__ void __launch_bounds__(kListWarps * kWarpSize)
    column_lists_kernel(const int8_t* block_map, int64_t columns, int64_t q_blocks, int64_t k_blocks,
                        int32_t* col_count, int32_t* col_index) {
  const int64_t column = (blockIdx.x * int64_t{kListWarps * kWarpSize} + threadIdx.x) / kWarpSize;
  if (column >= columns) return;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const unsigned lanes_below = (1u << lane) - 1u;
  const int8_t* map = block_map + column / k_blocks * q_blocks * k_blocks + column % k_blocks;
  int32_t* list = col_index + column * q_blocks;
  int32_t count = 0;
  for (int64_t m0 = 0; m0 < q_blocks; m0 += kWarpSize) {
    const int64_t m = m0 + lane;
    const bool critical = m < q_blocks && map[m * k_blocks] == kCritical;
    const unsigned chosen = __ballot_sync(kAllLanes, critical);
    if (critical) list[count + __popc(chosen & lanes_below)] = static_cast<int32_t>(m);
    count += __popc(chosen);
  }
  for (int64_t i = count + lane; i < q_blocks; i += kWarpSize) list[i] = -1;
  if (lane == 0) col_count[column] = count;
}

template <typename Element>
SumSource<Element> sum_source(const TensorView& x, int64_t block, double* sums) {
  const auto view = DeviceView<const Element>::of(x);
  bool vectorized = x.stride[kHeadDim] == 1 && reinterpret_cast<uintptr_t>(x.data) % sizeof(uint2) == 0;
  for (const Axis axis : {kBatch, kHeads, kLength})
    vectorized = vectorized && (x.size[axis] == 1 || x.stride[axis] % kChannelsPerThread == 0);
  return {view, x.heads(), x.length(), block, ceil_div(x.length(), block), sums, vectorized};
}

template <typename Element>
void launch_block_sums(const RouteParams& p, const PlanShape& s, const RouteBuffers& buffers, cudaStream_t stream) {
  BlockSumsArgs<Element> args{sum_source<Element>(p.q, s.block_q, buffers.q_means),
                              sum_source<Element>(p.k, s.block_k, buffers.k_means)};
  args.q_units = p.q.batch() * p.q.heads() * args.q.blocks;
  args.units = args.q_units + p.k.batch() * p.k.heads() * args.k.blocks;
  args.lanes = p.q.head_dim() / kChannelsPerThread;
  args.dim = p.q.head_dim();
  block_sums_kernel<Element>
      <<<static_cast<unsigned>(ceil_div(args.units * args.lanes, kSumThreads)), kSumThreads, 0, stream>>>(args);
  SLATTN_LAUNCH_CHECK("block_sums_kernel");
}

void launch_column_lists(const RoutingPlanView& plan, cudaStream_t stream) {
  const PlanShape& s = plan.shape;
  column_lists_kernel<<<static_cast<unsigned>(ceil_div(s.cols(), kListWarps)), kListWarps * kWarpSize, 0, stream>>>(
      plan.block_map, s.cols(), s.q_blocks(), s.k_blocks(), plan.col_count, plan.col_index);
  SLATTN_LAUNCH_CHECK("column_lists_kernel");
}

}  // namespace

size_t route_workspace_bytes(const RouteParams& params, const RoutingPlanView& plan) {
  return WorkspaceCarver::bytes_for<RouteBuffers>(params, plan.shape);
}

void route(const RouteParams& p, const RoutingPlanView& plan, void* workspace, size_t workspace_bytes,
           cudaStream_t stream) {
  const PlanShape& s = plan.shape;
  SLATTN_CHECK(s.k_blocks() <= kMaxKeyBlocks, "the CUDA router takes at most ", kMaxKeyBlocks,
               " key blocks per row, got ", s.k_blocks(), " (raise block_k)");
  SLATTN_CHECK(reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlignment == 0,
               "the CUDA router needs a workspace aligned to ", kWorkspaceAlignment, " bytes");
  WorkspaceCarver carver(workspace, workspace_bytes);
  const RouteBuffers buffers = RouteBuffers::carve(carver, p, s);
  const int64_t dim = p.q.head_dim(), kv_heads = p.k.heads();
  dispatch_element(p.q.dtype, [&](auto tag) { launch_block_sums<decltype(tag)>(p, s, buffers, stream); });

  SLATTN_CHECK(dim <= kKeyMeanThreads, "the CUDA router takes head dims up to ", kKeyMeanThreads, ", got ", dim);
  key_mean_kernel<<<dim3(static_cast<unsigned>(kv_heads), static_cast<unsigned>(s.batch)), kKeyMeanThreads, 0,
                    stream>>>(buffers.k_means, s.k_blocks(), s.k_len, dim, buffers.k_mean, buffers.k_norm_max);
  SLATTN_LAUNCH_CHECK("key_mean_kernel");

  const MeansArgs means{buffers,   s.rows(),  s.batch * kv_heads * s.k_blocks(), s.q_blocks(), s.k_blocks(),
                        s.q_len,   s.k_len,   s.block_q, s.block_k, dim};
  const int64_t mean_warps = means.q_rows + means.k_rows;
  block_means_kernel<<<static_cast<unsigned>(ceil_div(mean_warps * kWarpSize, kMeansThreads)), kMeansThreads, 0,
                       stream>>>(means);
  SLATTN_LAUNCH_CHECK("block_means_kernel");

  launch_approximate_scores(buffers.q_approx, buffers.k_approx, s, kv_heads, dim, buffers.scores, stream);
  const ClassifyArgs classify{buffers.scores,
                              buffers.q_means,
                              buffers.k_means,
                              buffers.q_norms,
                              buffers.k_norm_max,
                              s,
                              dim,
                              kv_heads,
                              static_cast<int>(critical_blocks_per_row(p.topk, s.k_blocks())),
                              static_cast<int>(negligible_blocks_per_row(p.topk, p.negligible, s.k_blocks())),
                              plan.block_map,
                              plan.row_count,
                              plan.row_index};
  launch_classify(classify, stream);
  launch_column_lists(plan, stream);
}

void build_block_lists(const RoutingPlanView& plan, cudaStream_t stream) {
  const PlanShape& s = plan.shape;
  int* invalid = nullptr;
  SLATTN_CUDA_CHECK(cudaMallocAsync(&invalid, sizeof(int), stream));
  SLATTN_CUDA_CHECK(cudaMemsetAsync(invalid, 0, sizeof(int), stream));
  constexpr int kThreads = 128;
  row_lists_kernel<<<static_cast<unsigned>(ceil_div(s.rows(), kThreads)), kThreads, 0, stream>>>(
      plan.block_map, s.rows(), s.k_blocks(), plan.row_count, plan.row_index, invalid);
  SLATTN_LAUNCH_CHECK("row_lists_kernel");
  launch_column_lists(plan, stream);
  int host_invalid = 0;
  SLATTN_CUDA_CHECK(cudaMemcpyAsync(&host_invalid, invalid, sizeof(int), cudaMemcpyDeviceToHost, stream));
  SLATTN_CUDA_CHECK(cudaFreeAsync(invalid, stream));
  SLATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  SLATTN_CHECK(!host_invalid, "block_map values must be -1 (negligible), 0 (marginal) or 1 (critical)");
}

}  // namespace slattn::cuda
