// Backward of the sparse branch on tensor cores (mma.sync m16n8k16, sm_80+),
// FlashAttention-2 style, in two deterministic kernels (no atomics):
//   dQ:    a thread block per query block walks its row list; each warp owns
//          16 query rows: S = Q Kᵀ, dP = dOs Vᵀ, dS = P (dP - D), dQ += dS K.
//   dK/dV: a thread block per 64 keys walks the column list of their key block
//          (for every query head of the GQA group); each warp owns 16 keys:
//          Sᵀ = K Qᵀ, dPᵀ = V dOsᵀ, dV += Pᵀ dOs, dK += dSᵀ Q.
// P comes back from the forward's LSE, so no softmax state is carried. P and
// dS enter the second product rounded to the input dtype, as in FlashAttention.
#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_backward_steps.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kTile = 64;  // keys per tile in the dQ kernel, keys and queries per tile in the dK/dV kernel
constexpr int kTiles8 = kTile / 8;

// The tiles a kernel walks are double-buffered: the next one loads during this one's math.
template <typename Element, int kHeadDim, int kBlockQ>
struct QueryBlockShared {
  TileRow<Element, kHeadDim> q[kBlockQ];
  TileRow<Element, kHeadDim> dos[kBlockQ];
  TileRow<Element, kHeadDim> k[2][kTile];
  TileRow<Element, kHeadDim> v[2][kTile];
};

template <typename Element, int kHeadDim>
struct KeyTileShared {
  TileRow<Element, kHeadDim> k[kTile];
  TileRow<Element, kHeadDim> v[kTile];
  TileRow<Element, kHeadDim> q[2][kTile];
  TileRow<Element, kHeadDim> dos[2][kTile];
  float lse_log2[2][kTile];  // +inf past the sequence: P = 0 there
  float delta[2][kTile];
};

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(kBlockQ / kRowsPerWarp * kWarpSize)
    sparse_dq_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a, DeviceView<const Element> dos) {
  constexpr int kThreads = kBlockQ / kRowsPerWarp * kWarpSize;
  constexpr int kDimTiles8 = kHeadDim / 8;
  using Shared = QueryBlockShared<Element, kHeadDim, kBlockQ>;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);

  const int warp = threadIdx.x / kWarpSize;
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t pair = b * g.heads + h;
  const int64_t row0 = m * kBlockQ;
  const int64_t padded0 = pair * g.q_rows() + row0;
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);

  load_tile<Element, kHeadDim, kThreads>(DeviceView<const Element>::of(a.q), b, h, row0, kBlockQ, g.q_len, s.q);
  load_tile<Element, kHeadDim, kThreads>(dos, b, h, row0, kBlockQ, g.q_rows(), s.dos);
  cp_async_commit();
  const int local0 = warp * kRowsPerWarp;
  float lse_log2[2], delta[2];
  load_query_row_stats(g, a, pair, row0 + local0, lse_log2, delta);
  const float scale_log2 = a.scale * kLog2e;
  float dq[kDimTiles8][4] = {};

  const int64_t plan_row = pair * g.q_blocks + m;
  const BlockTiles<kTile> tiles{plan.row_index + plan_row * g.k_blocks, plan.row_count[plan_row], g.block_k,
                                g.k_len};
  const int32_t total = tiles.count();
  auto load_keys = [&](int32_t t) {
    const int buffer = t & 1;
    load_tile<Element, kHeadDim, kThreads>(k, b, kv, tiles.first(t), kTile, tiles.end(t), s.k[buffer]);
    load_tile<Element, kHeadDim, kThreads>(v, b, kv, tiles.first(t), kTile, tiles.end(t), s.v[buffer]);
    cp_async_commit();
  };
  if (total > 0) load_keys(0);
  for (int32_t t = 0; t < total; ++t) {
    const int buffer = t & 1;
    await_tile(t, total, load_keys);  // tile t (and Q, dOs) is complete for every warp
    const int64_t first = tiles.first(t), end = tiles.end(t);
    float p[kTiles8][4] = {}, ds[kTiles8][4] = {};
    mma_a_bt<Element, kHeadDim, kTile>(p, &s.q[local0], s.k[buffer]);     // S
    mma_a_bt<Element, kHeadDim, kTile>(ds, &s.dos[local0], s.v[buffer]);  // dP
    score_grads(p, ds, first, end, scale_log2, lse_log2, delta);
    mma_p_b<Element, kHeadDim, kTile>(dq, ds, s.k[buffer]);
    __syncthreads();  // every warp is done with `buffer` before tile t + 2 is loaded into it
  }
  cp_async_wait<0>();  // nothing left in flight when no tile was walked
#pragma unroll
  for (int j = 0; j < kDimTiles8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t padded = padded0 + local0 + accumulator_row(e);
      a.dq_rows[padded * kHeadDim + accumulator_col(j, e)] = a.scale * dq[j][e];
    }
  }
}

// grid (Nk * tiles, Hkv, B): dK and dV of kTile keys.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kTile / kRowsPerWarp * kWarpSize)
    sparse_dkv_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a, DeviceView<const Element> dos) {
  constexpr int kThreads = kTile / kRowsPerWarp * kWarpSize;
  constexpr int kDimTiles8 = kHeadDim / 8;
  using Shared = KeyTileShared<Element, kHeadDim>;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);

  const int warp = threadIdx.x / kWarpSize;
  const int64_t tiles = ceil_div(g.block_k, kTile);
  const int64_t n = blockIdx.x / tiles, kv = blockIdx.y, b = blockIdx.z;
  const int64_t key0 = n * g.block_k + (blockIdx.x % tiles) * kTile;
  const int64_t key_end = min(min(g.k_len, (n + 1) * g.block_k), key0 + kTile);
  // A tile past the sequence walks nothing: its pad rows get zeros like every other pad row.
  const int64_t members = key0 < key_end ? g.group() : 0;
  const auto q = DeviceView<const Element>::of(a.q);
  load_tile<Element, kHeadDim, kThreads>(DeviceView<const Element>::of(a.k), b, kv, key0, kTile, key_end, s.k);
  load_tile<Element, kHeadDim, kThreads>(DeviceView<const Element>::of(a.v), b, kv, key0, kTile, key_end, s.v);
  cp_async_commit();
  const int local0 = warp * kRowsPerWarp;
  const float scale_log2 = a.scale * kLog2e;
  float dk[kDimTiles8][4] = {}, dv[kDimTiles8][4] = {};

  for (int64_t member = 0; member < members; ++member) {
    const int64_t h = kv * g.group() + member;
    const int64_t pair = b * g.heads + h;
    const int64_t column = pair * g.k_blocks + n;
    const BlockTiles<kTile> tiles{plan.col_index + column * g.q_blocks, plan.col_count[column], g.block_q, g.q_len};
    const int32_t total = tiles.count();
    auto load_queries = [&](int32_t t) {
      const int buffer = t & 1;
      const int64_t first = tiles.first(t), end = tiles.end(t);
      load_tile<Element, kHeadDim, kThreads>(q, b, h, first, kTile, end, s.q[buffer]);
      load_tile<Element, kHeadDim, kThreads>(dos, b, h, first, kTile, end, s.dos[buffer]);
      cp_async_commit();
      load_query_tile_stats<kTile, kThreads>(g, a, pair, first, end, s.lse_log2[buffer], s.delta[buffer]);
    };
    if (total > 0) load_queries(0);
    for (int32_t t = 0; t < total; ++t) {
      const int buffer = t & 1;
      await_tile(t, total, load_queries);  // tile t (and K, V) is complete for every warp
      float pt[kTiles8][4] = {}, dst[kTiles8][4] = {};
      mma_a_bt<Element, kHeadDim, kTile>(pt, &s.k[local0], s.q[buffer]);     // Sᵀ
      mma_a_bt<Element, kHeadDim, kTile>(dst, &s.v[local0], s.dos[buffer]);  // dPᵀ
      score_grads_transposed(pt, dst, scale_log2, s.lse_log2[buffer], s.delta[buffer]);
      mma_p_b<Element, kHeadDim, kTile>(dv, pt, s.dos[buffer]);
      mma_p_b<Element, kHeadDim, kTile>(dk, dst, s.q[buffer]);
      __syncthreads();  // every warp is done with `buffer` before tile t + 2 is loaded into it
    }
  }
  cp_async_wait<0>();  // nothing left in flight when no tile was walked
  const int64_t kv_pair = b * g.kv_heads + kv;
#pragma unroll
  for (int j = 0; j < kDimTiles8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t key = key0 + local0 + accumulator_row(e);
      const bool valid = key < key_end;  // pad rows get zeros
      const int64_t offset = (kv_pair * g.k_rows() + key) * kHeadDim + accumulator_col(j, e);
      a.dk_rows[offset] = valid ? a.scale * dk[j][e] : 0.0f;
      a.dv_rows[offset] = valid ? dv[j][e] : 0.0f;
    }
  }
}

}  // namespace

void sparse_backward_mma(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                         cudaStream_t stream) {
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    const auto dos = dos_view<Element>(g, args.dos_rows);
    launch_with_shared(sparse_dq_kernel<Element, D, BQ>,
                       dim3(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads),
                            static_cast<unsigned>(g.batch)),
                       BQ / kRowsPerWarp * kWarpSize, sizeof(QueryBlockShared<Element, D, BQ>), stream, g, plan,
                       args, dos);
    SLATTN_LAUNCH_CHECK("sparse_dq_kernel");
    const int64_t tiles = ceil_div(g.block_k, kTile);
    launch_with_shared(sparse_dkv_kernel<Element, D>,
                       dim3(static_cast<unsigned>(g.k_blocks * tiles), static_cast<unsigned>(g.kv_heads),
                            static_cast<unsigned>(g.batch)),
                       kTile / kRowsPerWarp * kWarpSize, sizeof(KeyTileShared<Element, D>), stream, g, plan, args,
                       dos);
    SLATTN_LAUNCH_CHECK("sparse_dkv_kernel");
  });
}

}  // namespace slattn::cuda
