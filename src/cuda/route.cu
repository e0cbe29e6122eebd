// Pooled router of SLA on the GPU (SPEC section 1), bit-identical to the CPU
// router: both use the arithmetic of route_math.h.
#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/workspace.h"
#include "route_math.h"

namespace slattn::cuda {
namespace {

namespace rm = route_math;

// Upper bound on key blocks per row: the scores of a row live in shared memory.
constexpr int64_t kMaxKeyBlocks = 4096;
constexpr int kClassifyThreads = 256;

struct RouteBuffers {
  double* q_sums;  // (B, Hq, Mq, D)
  double* k_sums;  // (B, Hkv, Nk, D)
  double* k_mean;  // (B, Hkv, D)

  static RouteBuffers carve(WorkspaceCarver& carver, const RouteParams& p, const PlanShape& s) {
    const int64_t dim = p.q.head_dim();
    return {carver.take<double>(s.batch * s.heads * s.q_blocks() * dim),
            carver.take<double>(s.batch * p.k.heads() * s.k_blocks() * dim),
            carver.take<double>(s.batch * p.k.heads() * dim)};
  }
};

// grid (blocks, heads, batch), one thread per column: sums[b, h, n, c] = Σ rows of block n.
template <typename Element>
__global__ void block_sums_kernel(DeviceView<const Element> x, int64_t length, int64_t block, double* sums) {
  const int64_t n = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t c = threadIdx.x;
  const int64_t dim = blockDim.x;
  double sum = 0.0;
  const int64_t end = min(length, (n + 1) * block);
  for (int64_t r = n * block; r < end; ++r) sum = rm::add(sum, static_cast<double>(x.load(b, h, r, c)));
  sums[((b * gridDim.y + h) * gridDim.x + n) * dim + c] = sum;
}

// grid (kv_heads, batch), one thread per column: the mean of K over all rows.
__global__ void key_mean_kernel(const double* k_sums, int64_t k_blocks, int64_t k_len, double* k_mean) {
  const int64_t pair = blockIdx.y * gridDim.x + blockIdx.x;
  const int64_t c = threadIdx.x;
  const int64_t dim = blockDim.x;
  double sum = 0.0;
  for (int64_t n = 0; n < k_blocks; ++n) sum = rm::add(sum, k_sums[(pair * k_blocks + n) * dim + c]);
  k_mean[pair * dim + c] = rm::div(sum, static_cast<double>(k_len));
}

struct ClassifyArgs {
  const double* q_sums;
  const double* k_sums;
  const double* k_mean;
  PlanShape shape;
  int64_t dim;
  int64_t kv_heads;
  int64_t n_crit;
  int64_t n_negl;
  int8_t* block_map;
  int32_t* row_count;
  int32_t* row_index;
};

// grid (Mq, Hq, B): scores of one query block against every key block, the
// classes by rank, and the sorted row list of critical blocks.
__global__ void __launch_bounds__(kClassifyThreads) classify_kernel(ClassifyArgs a) {
  extern __shared__ double shared[];
  const int64_t k_blocks = a.shape.k_blocks();
  const int64_t q_blocks = a.shape.q_blocks();
  double* q_mean = shared;               // (D)
  double* keys = shared + a.dim;         // (Nk)
  int8_t* classes = reinterpret_cast<int8_t*>(keys + k_blocks);  // (Nk)
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / (a.shape.heads / a.kv_heads);
  const int64_t row = (b * a.shape.heads + h) * q_blocks + m;

  const auto q_count = static_cast<double>(min(a.shape.q_len, (m + 1) * a.shape.block_q) - m * a.shape.block_q);
  for (int64_t c = threadIdx.x; c < a.dim; c += blockDim.x) q_mean[c] = rm::div(a.q_sums[row * a.dim + c], q_count);
  __syncthreads();
  const double* k_sums = a.k_sums + (b * a.kv_heads + kv) * k_blocks * a.dim;
  const double* k_mean = a.k_mean + (b * a.kv_heads + kv) * a.dim;
  for (int64_t n = threadIdx.x; n < k_blocks; n += blockDim.x) {
    const int64_t count = min(a.shape.k_len, (n + 1) * a.shape.block_k) - n * a.shape.block_k;
    keys[n] = rm::rank_key(rm::block_score(q_mean, k_sums + n * a.dim, k_mean, count, a.dim));
  }
  __syncthreads();
  int8_t* map = a.block_map + row * k_blocks;
  for (int64_t n = threadIdx.x; n < k_blocks; n += blockDim.x) {
    // Block n is critical when fewer than n_crit blocks outrank it, and
    // negligible when it outranks fewer than n_negl; the counts stop as soon as
    // both answers are known (most blocks are marginal and stop early).
    int64_t above = 0, below = 0;
    for (int64_t other = 0; other < k_blocks && (above < a.n_crit || below < a.n_negl); ++other) {
      if (other == n) continue;
      if (rm::outranks(keys[other], other, keys[n], n)) {
        ++above;
      } else {
        ++below;
      }
    }
    const int8_t cls = above < a.n_crit ? kCritical : below < a.n_negl ? kNegligible : kMarginal;
    classes[n] = cls;
    map[n] = cls;
  }
  __syncthreads();
  int32_t* list = a.row_index + row * k_blocks;
  for (int64_t n = threadIdx.x; n < k_blocks; n += blockDim.x) {
    if (classes[n] == kCritical) {
      int64_t position = 0;
      for (int64_t other = 0; other < n; ++other) position += classes[other] == kCritical ? 1 : 0;
      list[position] = static_cast<int32_t>(n);
    }
  }
  for (int64_t i = a.n_crit + threadIdx.x; i < k_blocks; i += blockDim.x) list[i] = -1;
  if (threadIdx.x == 0) a.row_count[row] = static_cast<int32_t>(a.n_crit);
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

// One thread per key-block column: the ascending list of query blocks that chose it.
__global__ void column_lists_kernel(const int8_t* block_map, int64_t pairs, int64_t q_blocks, int64_t k_blocks,
                                    int32_t* col_count, int32_t* col_index) {
  const int64_t column = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (column >= pairs * k_blocks) return;
  const int64_t pair = column / k_blocks, n = column % k_blocks;
  const int8_t* map = block_map + pair * q_blocks * k_blocks + n;
  int32_t* list = col_index + column * q_blocks;
  int32_t count = 0;
  for (int64_t m = 0; m < q_blocks; ++m)
    if (map[m * k_blocks] == kCritical) list[count++] = static_cast<int32_t>(m);
  col_count[column] = count;
  for (int64_t i = count; i < q_blocks; ++i) list[i] = -1;
}

template <typename Element>
void launch_block_sums(const TensorView& x, int64_t block, double* sums, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(x.length(), block)), static_cast<unsigned>(x.heads()),
                  static_cast<unsigned>(x.batch()));
  block_sums_kernel<Element><<<grid, static_cast<unsigned>(x.head_dim()), 0, stream>>>(
      DeviceView<const Element>::of(x), x.length(), block, sums);
  SLATTN_LAUNCH_CHECK("block_sums_kernel");
}

void launch_column_lists(const RoutingPlanView& plan, cudaStream_t stream) {
  const PlanShape& s = plan.shape;
  const int64_t columns = s.cols();
  constexpr int kThreads = 128;
  column_lists_kernel<<<static_cast<unsigned>(ceil_div(columns, kThreads)), kThreads, 0, stream>>>(
      plan.block_map, s.batch * s.heads, s.q_blocks(), s.k_blocks(), plan.col_count, plan.col_index);
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
  WorkspaceCarver carver(workspace, workspace_bytes);
  const RouteBuffers buffers = RouteBuffers::carve(carver, p, s);
  dispatch_element(p.q.dtype, [&](auto tag) {
    using Element = decltype(tag);
    launch_block_sums<Element>(p.q, s.block_q, buffers.q_sums, stream);
    launch_block_sums<Element>(p.k, s.block_k, buffers.k_sums, stream);
  });
  const int64_t dim = p.q.head_dim();
  key_mean_kernel<<<dim3(static_cast<unsigned>(p.k.heads()), static_cast<unsigned>(s.batch)),
                    static_cast<unsigned>(dim), 0, stream>>>(buffers.k_sums, s.k_blocks(), s.k_len, buffers.k_mean);
  SLATTN_LAUNCH_CHECK("key_mean_kernel");

  ClassifyArgs args{buffers.q_sums, buffers.k_sums, buffers.k_mean, s, dim, p.k.heads(),
                    critical_blocks_per_row(p.topk, s.k_blocks()),
                    negligible_blocks_per_row(p.topk, p.negligible, s.k_blocks()),
                    plan.block_map, plan.row_count, plan.row_index};
  const size_t shared = (dim + s.k_blocks()) * sizeof(double) + s.k_blocks();
  SLATTN_CUDA_CHECK(cudaFuncSetAttribute(classify_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared)));
  classify_kernel<<<dim3(static_cast<unsigned>(s.q_blocks()), static_cast<unsigned>(s.heads),
                         static_cast<unsigned>(s.batch)),
                    kClassifyThreads, shared, stream>>>(args);
  SLATTN_LAUNCH_CHECK("classify_kernel");
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
