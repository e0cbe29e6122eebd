// The projection's gradients on Hopper (projection_grads_wgmma.h). Per query
// block the consumers issue dW += dO_mᵀ Ol_m (both tiles read with their rows
// along K) and, while it runs, thread (half, f) adds column f of dO_m over
// half of the block's rows. Built for sm_90a only.
#include "cuda/projection_grads_wgmma.h"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_kernels.h"
#include "cuda/linear_set_operands.h"
#include "cuda/linear_set_products.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tensor_map.h"
#include "cuda/tile_mma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

template <typename Element, int kHeadDim, int kBlockQ, int kStages>
struct ProjectionGradShared {
  using RowTile = SwizzledTile<Element, kBlockQ, kHeadDim>;
  RowTile dout[kStages];
  RowTile ol[kStages];
  KeyTilePipeline<kStages> pipe;  // dO_m and Ol_m of a stage complete its "keys" barrier
};

template <typename Element, int kHeadDim, int kBlockQ>
struct WgmmaProjectionGrads {
  static constexpr int kConsumers = kHeadDim / kWarpgroupRows;  // a warpgroup per 64 output features
  static constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
  static constexpr int kThreads = kConsumerThreads + kWarpSize;  // the producer warp last
  static constexpr int kStages =
      sizeof(ProjectionGradShared<Element, kHeadDim, kBlockQ, 3>) + kSwizzleAtomBytes <= kHopperSharedPerBlock ? 3
                                                                                                               : 2;
  using Shared = ProjectionGradShared<Element, kHeadDim, kBlockQ, kStages>;
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
  static_assert(kConsumerThreads == 2 * kHeadDim, "db: two threads per feature, a half of the rows each");
};

struct ProjectionMaps {
  RowTileMap dout, ol;  // boxes of block_q rows
};

struct ProjectionPartials {
  float* weight;  // (blocks, D, D)
  float* bias;    // (2 blocks, D): a half of the rows each
};

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(WgmmaProjectionGrads<Element, kHeadDim, kBlockQ>::kThreads,
                                  WgmmaProjectionGrads<Element, kHeadDim, kBlockQ>::kBlocksPerSm)
    projection_grads_wgmma_kernel(const __grid_constant__ ProjectionMaps maps, Geometry g, ProjectionPartials out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaProjectionGrads<Element, kHeadDim, kBlockQ>;
  using Shared = typename Config::Shared;
  using RowTile = typename Shared::RowTile;
  constexpr int kTiles = kHeadDim / 8;  // accumulator tiles of a row of dW
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  if (threadIdx.x == 0) s.pipe.init(Config::kConsumerThreads);
  __syncthreads();
  const int64_t items = g.q_pairs() * g.q_blocks;

  if (threadIdx.x >= Config::kConsumerThreads) {  // the producer warp: its first lane copies
    if (threadIdx.x != Config::kConsumerThreads) return;
    produce_one_stage_items(s.pipe, items, 2 * sizeof(RowTile), [&](int64_t item, int stage, SharedBarrier& full) {
      const QueryItem at = QueryItem::of(item, g);
      load_row_tile(s.dout[stage], maps.dout, at.m * kBlockQ, at.h, at.b, full);
      load_row_tile(s.ol[stage], maps.ol, at.m * kBlockQ, at.h, at.b, full);
    });
    return;
  }

  const int thread = threadIdx.x;
  const int warpgroup = thread / kWarpgroupThreads;
  const int feature = thread % kHeadDim, half = thread / kHeadDim;  // the thread's column of db
  float dw[kTiles][4] = {};
  float db = 0.0f;
  int32_t t = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++t) {
    const RowTile& dout = s.dout[t % Config::kStages];
    s.pipe.wait_keys(t);
    wgmma_fence();
    issue_columns_times(dw, dout, warpgroup, s.ol[t % Config::kStages]);
    wgmma_commit();
    for (int i = half * (kBlockQ / 2); i < (half + 1) * (kBlockQ / 2); ++i)
      db += to_float(dout.unit(i, feature / 8)[feature % 8]);
    wgmma_wait<0>();
    fence_accumulators(dw);
    s.pipe.release_keys(t);
  }

  // The thread's first output feature (its second is 8 below), as in the accumulators.
  const int row = warpgroup * kWarpgroupRows + thread % kWarpgroupThreads / kWarpSize * kRowsPerWarp +
                  thread % kWarpSize / 4;
  float* weight = out.weight + (blockIdx.x * int64_t(kHeadDim) + row) * kHeadDim + 2 * (thread % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
      *reinterpret_cast<float2*>(weight + 8 * r * kHeadDim + 8 * j) = make_float2(dw[j][2 * r], dw[j][2 * r + 1]);
  out.bias[(2 * blockIdx.x + half) * int64_t(kHeadDim) + feature] = db;
#endif
}

// The kernel's configuration at g, and its grid.
template <typename F>
void with_projection_kernel(const Geometry& g, DType dtype, F&& f) {
  dispatch_sparse_kernel(dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    using Config = WgmmaProjectionGrads<Element, D, BQ>;
    const int64_t items = g.q_pairs() * g.q_blocks;
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    f(projection_grads_wgmma_kernel<Element, D, BQ>, Config{}, grid);
  });
}

}  // namespace

int64_t projection_grad_partial_floats(const Geometry& g) {
  int64_t floats = 0;
  with_projection_kernel(g, DType::bfloat16, [&](auto, auto, unsigned grid) {
    floats = grid * (g.dim * g.dim + 2 * g.dim);
  });
  return floats;
}

void projection_grads_wgmma(const Geometry& g, const TensorView& dout, const void* ol_low, float* partials,
                            float* d_weight, float* d_bias, cudaStream_t stream) {
  unsigned blocks = 0;
  with_projection_kernel(g, dout.dtype, [&](auto kernel, auto config, unsigned grid) {
    using Config = decltype(config);
    static const bool available = loaded_for_hopper(kernel);
    const char* refusal = hopper_kernel_refusal(available, Config::kSharedBytes);
    SLATTN_CHECK(refusal == nullptr, "projection_grads_wgmma: ", refusal);
    ProjectionMaps maps{};
    const bool mapped =
        make_row_tile_map(dout, g.block_q, &maps.dout) &&
        make_row_tile_map(dense_rows(const_cast<void*>(ol_low), dout.dtype, g.batch, g.heads, g.q_rows(), g.dim),
                          g.block_q, &maps.ol);
    SLATTN_CHECK(mapped, "projection_grads_wgmma: the tile copy engine refused dout or the Ol rows");
    blocks = grid;
    const ProjectionPartials out{partials, partials + grid * g.dim * g.dim};
    launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, out);
    SLATTN_LAUNCH_CHECK("projection_grads_wgmma_kernel");
  });
  column_sums(partials, 1, blocks, g.dim * g.dim, d_weight, stream);
  if (d_bias) column_sums(partials + blocks * g.dim * g.dim, 1, 2 * blocks, g.dim, d_bias, stream);
}

}  // namespace slattn::cuda
