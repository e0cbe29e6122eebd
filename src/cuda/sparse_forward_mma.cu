// Forward of the sparse branch on tensor cores (mma.sync m16n8k16, sm_80+):
// FlashAttention-2 style. A thread block owns one query block; each warp owns
// 16 of its rows and walks the critical key blocks of its row list in tiles
// of kKeyTile keys staged in shared memory, with the online softmax in
// registers.
#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kKeyTile = 64;  // keys per shared-memory tile

template <typename Element, int kHeadDim, int kBlockQ>
struct ForwardShared {
  TileRow<Element, kHeadDim> q[kBlockQ];
  TileRow<Element, kHeadDim> k[2][kKeyTile];  // double-buffered: the next tile loads during this one's math
  TileRow<Element, kHeadDim> v[2][kKeyTile];
};

// Two thread blocks per SM (registers capped at 128 for 256 threads): their
// shared memory fits, and the second hides the first's barriers and loads.
template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(kBlockQ / kRowsPerWarp * kWarpSize, 2)
    sparse_forward_mma_kernel(Geometry g, RoutingPlanView plan, SparseForwardArgs a) {
  constexpr int kThreads = kBlockQ / kRowsPerWarp * kWarpSize;
  constexpr int kKeyTiles8 = kKeyTile / 8;   // n-tiles of S
  constexpr int kDimTiles8 = kHeadDim / 8;   // n-tiles of O
  using Shared = ForwardShared<Element, kHeadDim, kBlockQ>;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);

  const int warp = threadIdx.x / kWarpSize;
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t pair = b * g.heads + h;
  const int64_t row0 = m * kBlockQ;
  const auto q = DeviceView<const Element>::of(a.q);
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);

  load_tile<Element, kHeadDim, kThreads>(q, b, h, row0, kBlockQ, g.q_len, s.q);
  cp_async_commit();
  const TileRow<Element, kHeadDim>* q_rows = &s.q[warp * kRowsPerWarp];

  const float scale_log2 = a.scale * kLog2e;  // scores in log2 units: exp2 is one instruction
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  float out[kDimTiles8][4] = {};

  const int64_t plan_row = pair * g.q_blocks + m;
  const BlockTiles<kKeyTile> tiles{plan.row_index + plan_row * g.k_blocks, plan.row_count[plan_row], g.block_k,
                                   g.k_len};
  const int32_t total = tiles.count();
  auto load_keys = [&](int32_t t) {
    const int buffer = t & 1;
    load_tile<Element, kHeadDim, kThreads>(k, b, kv, tiles.first(t), kKeyTile, tiles.end(t), s.k[buffer]);
    load_tile<Element, kHeadDim, kThreads>(v, b, kv, tiles.first(t), kKeyTile, tiles.end(t), s.v[buffer]);
    cp_async_commit();
  };
  if (total > 0) load_keys(0);
  for (int32_t t = 0; t < total; ++t) {
    const int buffer = t & 1;
    await_tile(t, total, load_keys);  // tile t (and Q) is complete for every warp
    const int64_t first = tiles.first(t), end = tiles.end(t);  // read before the products: fewer live registers
    float score[kKeyTiles8][4] = {};
    mma_a_bt<Element, kHeadDim, kKeyTile>(score, q_rows, s.k[buffer]);
    online_softmax_step<KeyMask::every_tile>(score, out, row_max, row_sum, first, end, scale_log2);
    mma_p_b<Element, kHeadDim, kKeyTile>(out, score, s.v[buffer]);  // O += P V
    __syncthreads();  // every warp is done with `buffer` before tile t + 2 is loaded into it
  }

  cp_async_wait<0>();  // nothing left in flight when no tile was walked
  store_forward_rows<Element, kHeadDim>(g, a, b, h, row0 + warp * kRowsPerWarp, out, row_max, row_sum);
}

}  // namespace

void sparse_forward_mma(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    launch_with_shared(sparse_forward_mma_kernel<Element, D, BQ>, grid, BQ / kRowsPerWarp * kWarpSize,
                       sizeof(ForwardShared<Element, D, BQ>), stream, g, plan, args);
  });
  SLATTN_LAUNCH_CHECK("sparse_forward_mma_kernel");
}

}  // namespace slattn::cuda
