// Backward of the sparse branch on Hopper (sm_90a): the two deterministic
// kernels of sparse_backward_mma.cu on warpgroup products.
//   dQ:    a thread block per query block, each warpgroup 64 of its rows,
//          walks the row list in tiles of kTile keys: S = Q Kᵀ and dP = dOs Vᵀ
//          from shared memory, dS = P (dP - D) in registers, dQ += dS K.
//   dK/dV: a thread block per key block, each warpgroup 64 of its keys, walks
//          the column list (every query head of the GQA group) in tiles of
//          kTile queries: Sᵀ = K Qᵀ, dPᵀ = V dOsᵀ, dV += Pᵀ dOs, dK += dSᵀ Q.
// K in dQ += dS K, and dOs, Q in the dK/dV products, are read MN-major from
// the same swizzled tiles the first products read K-major. Built for sm_90a
// only (see sparse_forward_wgmma.cu).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_backward_steps.cuh"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kTile = 64;  // keys per tile in the dQ kernel, queries per tile in the dK/dV kernel
using Accumulators64 = float[kTile / 8][4];
using Fragments64 = uint32_t[kTile / 16][4];

template <typename Element, int kHeadDim, int kBlockQ>
struct WgmmaQueryBlockShared {
  SwizzledTile<Element, kBlockQ, kHeadDim> q, dos;
  SwizzledTile<Element, kTile, kHeadDim> k[2], v[2];  // double-buffered
};

template <typename Element, int kHeadDim, int kBlockK>
struct WgmmaKeyBlockShared {
  SwizzledTile<Element, kBlockK, kHeadDim> k, v;
  SwizzledTile<Element, kTile, kHeadDim> q[2], dos[2];  // double-buffered
  float lse_log2[2][kTile];  // +inf past the sequence: P = 0 there
  float delta[2][kTile];
};

template <int kRows>
constexpr int warpgroup_threads() {
  return kRows / kWarpgroupRows * kWarpgroupThreads;
}

// acc (64 x N) = A · Bᵀ over kHeadDim, A the warpgroup's 64 rows of a K-major tile from `row`, B a K-major tile.
template <typename Element, int kHeadDim, int N, typename TileA, typename TileB>
__device__ __forceinline__ void product_a_bt(float (&acc)[N / 8][4], const TileA& a, int row, const TileB& b) {
  uint64_t a_desc = k_major_descriptor(a);
  opaque(a_desc);
  const uint64_t b_desc = k_major_descriptor(b);
#pragma unroll
  for (int step = 0; step < kHeadDim / 16; ++step)
    wgmma_ss<Element, N, 0, 0>(acc, a_desc + k_major_offset<TileA>(row, step), b_desc + k_major_offset<TileB>(0, step),
                               step > 0);
}

// acc (64 x kHeadDim) += P · B, P (64 x kTile) given as A fragments
// (accumulators_to_fragments), B a (kTile x kHeadDim) tile read MN-major.
template <typename Element, int kHeadDim, typename TileB>
__device__ __forceinline__ void product_p_b(float (&acc)[kHeadDim / 8][4], const Fragments64& p, const TileB& b) {
  uint64_t b_desc = mn_major_descriptor(b);
  opaque(b_desc);
#pragma unroll
  for (int step = 0; step < kTile / 16; ++step)
    wgmma_rs<Element, kHeadDim, 1>(acc, p[step], b_desc + mn_major_offset(step), true);
}

// Issues the batch `issue` on the warpgroup's tensor cores and waits for it; `acc` are its accumulators.
template <typename Issue, int... kTiles>
__device__ __forceinline__ void run_products(Issue&& issue, float (&... acc)[kTiles][4]) {
  (fence_accumulators(acc), ...);
  wgmma_fence();
  issue();
  wgmma_commit();
  wgmma_wait<0>();
  (fence_accumulators(acc), ...);
}

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(warpgroup_threads<kBlockQ>(), 1)
    sparse_dq_wgmma_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a, DeviceView<const Element> dos) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = warpgroup_threads<kBlockQ>();
  using Shared = WgmmaQueryBlockShared<Element, kHeadDim, kBlockQ>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  const int warp = threadIdx.x / kWarpSize;
  const int warpgroup_row0 = threadIdx.x / kWarpgroupThreads * kWarpgroupRows;
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t pair = b * g.heads + h;
  const int64_t row0 = m * kBlockQ;
  const int64_t padded0 = pair * g.q_rows() + row0;
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);

  s.q.template load<kThreads>(DeviceView<const Element>::of(a.q), b, h, row0, g.q_len);
  s.dos.template load<kThreads>(dos, b, h, row0, g.q_rows());
  cp_async_commit();
  const int local0 = warp * kRowsPerWarp;
  float lse_log2[2], delta[2];
  load_query_row_stats(g, a, pair, row0 + local0, lse_log2, delta);
  const float scale_log2 = a.scale * kLog2e;
  float dq[kHeadDim / 8][4] = {};

  const auto tiles = shared_row_tiles<kTile, kThreads>(g, plan, pair, m,
                                                      reinterpret_cast<int32_t*>(&s + 1));  // after the tiles
  const int32_t total = tiles.count();
  auto load_keys = [&](int32_t t) {
    load_tile_pair<kThreads>(s.k[t & 1], s.v[t & 1], k, v, b, kv, tiles.first(t), tiles.end(t));
  };
  if (total > 0) load_keys(0);
  for (int32_t t = 0; t < total; ++t) {
    const int buffer = t & 1;
    await_tile<true>(t, total, load_keys);  // tile t (and Q, dOs) is complete and visible to the tensor cores
    const int64_t first = tiles.first(t), end = tiles.end(t);
    Accumulators64 p, ds;
    run_products(
        [&] {
          product_a_bt<Element, kHeadDim, kTile>(p, s.q, warpgroup_row0, s.k[buffer]);     // S
          product_a_bt<Element, kHeadDim, kTile>(ds, s.dos, warpgroup_row0, s.v[buffer]);  // dP
        },
        p, ds);
    score_grads(p, ds, first, end, scale_log2, lse_log2, delta);
    Fragments64 ds_fragments;
    accumulators_to_fragments<Element, kTile>(ds, ds_fragments);
    run_products([&] { product_p_b<Element, kHeadDim>(dq, ds_fragments, s.k[buffer]); }, dq);
    __syncthreads();  // every warpgroup is done with `buffer` before tile t + 2 is loaded into it
  }
  cp_async_wait<0>();  // nothing left in flight when no tile was walked
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      accumulator_pair(a.dq_rows + (padded0 + local0) * kHeadDim, kHeadDim, j, r) =
          make_float2(a.scale * dq[j][2 * r], a.scale * dq[j][2 * r + 1]);
  }
#endif
}

// grid (Nk, Hkv, B): dK and dV of one key block.
template <typename Element, int kHeadDim, int kBlockK>
__global__ void __launch_bounds__(warpgroup_threads<kBlockK>(), 1)
    sparse_dkv_wgmma_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a, DeviceView<const Element> dos) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = warpgroup_threads<kBlockK>();
  using Shared = WgmmaKeyBlockShared<Element, kHeadDim, kBlockK>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  const int warp = threadIdx.x / kWarpSize;
  const int warpgroup_row0 = threadIdx.x / kWarpgroupThreads * kWarpgroupRows;
  const int64_t n = blockIdx.x, kv = blockIdx.y, b = blockIdx.z;
  const int64_t key0 = n * kBlockK;
  const int64_t key_end = min(g.k_len, key0 + kBlockK);
  const auto q = DeviceView<const Element>::of(a.q);
  s.k.template load<kThreads>(DeviceView<const Element>::of(a.k), b, kv, key0, key_end);
  s.v.template load<kThreads>(DeviceView<const Element>::of(a.v), b, kv, key0, key_end);
  cp_async_commit();
  const int local0 = warp * kRowsPerWarp;
  const float scale_log2 = a.scale * kLog2e;
  float dk[kHeadDim / 8][4] = {}, dv[kHeadDim / 8][4] = {};

  for (int64_t member = 0; member < g.group(); ++member) {
    const int64_t h = kv * g.group() + member;
    const int64_t pair = b * g.heads + h;
    const int64_t column = pair * g.k_blocks + n;
    const BlockTiles<kTile> tiles{copy_block_list<kThreads>(plan.col_index + column * g.q_blocks,
                                                            plan.col_count[column], reinterpret_cast<int32_t*>(&s + 1)),
                                  plan.col_count[column], g.block_q, g.q_len};
    const int32_t total = tiles.count();
    auto load_queries = [&](int32_t t) {
      const int buffer = t & 1;
      const int64_t first = tiles.first(t), end = tiles.end(t);
      load_tile_pair<kThreads>(s.q[buffer], s.dos[buffer], q, dos, b, h, first, end);
      load_query_tile_stats<kTile, kThreads>(g, a, pair, first, end, s.lse_log2[buffer], s.delta[buffer]);
    };
    if (total > 0) load_queries(0);
    for (int32_t t = 0; t < total; ++t) {
      const int buffer = t & 1;
      await_tile<true>(t, total, load_queries);  // tile t (and K, V) is complete and visible to the tensor cores
      Accumulators64 pt, dst;
      run_products(
          [&] {
            product_a_bt<Element, kHeadDim, kTile>(pt, s.k, warpgroup_row0, s.q[buffer]);     // Sᵀ
            product_a_bt<Element, kHeadDim, kTile>(dst, s.v, warpgroup_row0, s.dos[buffer]);  // dPᵀ
          },
          pt, dst);
      score_grads_transposed(pt, dst, scale_log2, s.lse_log2[buffer], s.delta[buffer]);
      Fragments64 pt_fragments, dst_fragments;
      accumulators_to_fragments<Element, kTile>(pt, pt_fragments);
      accumulators_to_fragments<Element, kTile>(dst, dst_fragments);
      run_products(
          [&] {
            product_p_b<Element, kHeadDim>(dv, pt_fragments, s.dos[buffer]);
            product_p_b<Element, kHeadDim>(dk, dst_fragments, s.q[buffer]);
          },
          dv, dk);
      __syncthreads();  // every warpgroup is done with `buffer` before tile t + 2 is loaded into it
    }
  }
  cp_async_wait<0>();  // nothing left in flight when no tile was walked
  const int64_t kv_pair = b * g.kv_heads + kv;
  const int64_t warp_rows = (kv_pair * g.k_rows() + key0 + local0) * kHeadDim;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = key0 + local0 + accumulator_row(2 * r) < key_end;  // pad rows get zeros
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      accumulator_pair(a.dk_rows + warp_rows, kHeadDim, j, r) =
          valid ? make_float2(a.scale * dk[j][2 * r], a.scale * dk[j][2 * r + 1]) : make_float2(0.0f, 0.0f);
      accumulator_pair(a.dv_rows + warp_rows, kHeadDim, j, r) =
          valid ? make_float2(dv[j][2 * r], dv[j][2 * r + 1]) : make_float2(0.0f, 0.0f);
    }
  }
#endif
}

}  // namespace

bool sparse_backward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                           cudaStream_t stream) {
  bool launched = false;
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, BK = decltype(block_k)::value;
    const auto dos = dos_view<Element>(g, args.dos_rows);
    const auto dq_kernel = sparse_dq_wgmma_kernel<Element, D, BQ>;
    const auto dkv_kernel = sparse_dkv_wgmma_kernel<Element, D, BK>;
    static const bool available = loaded_for_hopper(dq_kernel) && loaded_for_hopper(dkv_kernel);
    const size_t dq_shared = kSwizzleAtomBytes + sizeof(WgmmaQueryBlockShared<Element, D, BQ>) +
                             g.k_blocks * sizeof(int32_t);  // + the row list
    const size_t dkv_shared = kSwizzleAtomBytes + sizeof(WgmmaKeyBlockShared<Element, D, BK>) +
                              g.q_blocks * sizeof(int32_t);  // + the column list
    if (!available || std::max(dq_shared, dkv_shared) > max_shared_per_block()) return;
    const dim3 dq_grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads),
                       static_cast<unsigned>(g.batch));
    launch_with_shared(dq_kernel, dq_grid, warpgroup_threads<BQ>(), dq_shared, stream, g, plan, args, dos);
    SLATTN_LAUNCH_CHECK("sparse_dq_wgmma_kernel");
    const dim3 dkv_grid(static_cast<unsigned>(g.k_blocks), static_cast<unsigned>(g.kv_heads),
                        static_cast<unsigned>(g.batch));
    launch_with_shared(dkv_kernel, dkv_grid, warpgroup_threads<BK>(), dkv_shared, stream, g, plan, args, dos);
    SLATTN_LAUNCH_CHECK("sparse_dkv_wgmma_kernel");
    launched = true;
  });
  return launched;
}

}  // namespace slattn::cuda
