// Forward of the sparse branch on Hopper (sm_90a): the FlashAttention-2
// schedule of sparse_forward_mma.cu on warpgroup products. A thread block owns
// one query block, each warpgroup 64 of its rows; every thread helps copy the
// key tiles of the row list (double-buffered, 128-byte swizzled) while the
// warpgroups compute S = Q Kᵀ from shared memory and O += P V with P in
// registers. Built for sm_90a only; other targets get an empty body that is
// never launched (sparse_forward checks the loaded binary). FlashAttention-3's
// intra-warpgroup overlap was tried here and was slower without a producer
// warp (docs/performance.md).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tensor_map.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
struct WgmmaForwardShared {
  SwizzledTile<Element, kBlockQ, kHeadDim> q;
  SwizzledTile<Element, kKeyTile, kHeadDim> k[2];  // double-buffered: the next tile loads during this one's math
  SwizzledTile<Element, kKeyTile, kHeadDim> v[2];
};

// The tiles, with room to align the dynamic buffer to the swizzle atom; the
// launch adds the row list (k_blocks entries), copied after the tiles.
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
constexpr size_t wgmma_forward_shared_bytes() {
  return sizeof(WgmmaForwardShared<Element, kHeadDim, kBlockQ, kKeyTile>) + kSwizzleAtomBytes;
}

template <int kBlockQ>
constexpr int wgmma_forward_threads() {
  return kBlockQ / kWarpgroupRows * kWarpgroupThreads;
}

// Two thread blocks per SM where their shared memory fits: the second hides
// the first's prologue, epilogue and barriers (a block walks ~13 tiles at 95% sparsity).
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
constexpr int wgmma_forward_blocks_per_sm() {
  constexpr size_t kSharedPerSm = 228 * 1024, kReservedPerBlock = 1024;
  return 2 * (wgmma_forward_shared_bytes<Element, kHeadDim, kBlockQ, kKeyTile>() + kReservedPerBlock) <= kSharedPerSm
             ? 2
             : 1;
}

template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
__global__ void __launch_bounds__(wgmma_forward_threads<kBlockQ>(),
                                  (wgmma_forward_blocks_per_sm<Element, kHeadDim, kBlockQ, kKeyTile>()))
    sparse_forward_wgmma_kernel(Geometry g, RoutingPlanView plan, SparseForwardArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = wgmma_forward_threads<kBlockQ>();
  using Shared = WgmmaForwardShared<Element, kHeadDim, kBlockQ, kKeyTile>;
  using QTile = decltype(Shared::q);
  using KeyTile = SwizzledTile<Element, kKeyTile, kHeadDim>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  const int warp = threadIdx.x / kWarpSize;  // owns query rows 16 warp .. 16 warp + 15 of the block
  const int warpgroup_row0 = threadIdx.x / kWarpgroupThreads * kWarpgroupRows;
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t row0 = m * kBlockQ;
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);

  s.q.template load<kThreads>(DeviceView<const Element>::of(a.q), b, h, row0, g.q_len);
  cp_async_commit();

  const float scale_log2 = a.scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  float out[kHeadDim / 8][4] = {};

  const auto tiles = shared_row_tiles<kKeyTile, kThreads>(g, plan, b * g.heads + h, m,
                                                          reinterpret_cast<int32_t*>(&s + 1));  // after the tiles
  const int32_t total = tiles.count();
  auto load_keys = [&](int32_t t) {
    load_tile_pair<kThreads>(s.k[t & 1], s.v[t & 1], k, v, b, kv, tiles.first(t), tiles.end(t));
  };
  if (total > 0) load_keys(0);
  for (int32_t t = 0; t < total; ++t) {
    const int buffer = t & 1;
    await_tile<true>(t, total, load_keys);  // tile t (and Q) is complete and visible to the tensor cores
    const int64_t first = tiles.first(t), end = tiles.end(t);

    uint64_t q_desc = k_major_descriptor(s.q), k_desc = k_major_descriptor(s.k[buffer]);
    opaque(q_desc);
    float score[kKeyTile / 8][4];
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kHeadDim / 16; ++step) {  // S = Q Kᵀ, 16 head dims a step
      wgmma_ss<Element, kKeyTile, 0, 0>(score, q_desc + k_major_offset<QTile>(warpgroup_row0, step),
                                        k_desc + k_major_offset<KeyTile>(0, step), step > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(score);

    online_softmax_step<KeyMask::partial_tiles>(score, out, row_max, row_sum, first, end, scale_log2);

    uint32_t p[kKeyTile / 16][4];
    accumulators_to_fragments<Element, kKeyTile>(score, p);
    uint64_t v_desc = mn_major_descriptor(s.v[buffer]);
    opaque(v_desc);
    fence_accumulators(out);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kKeyTile / 16; ++step)  // O += P V, 16 keys a step; V is read N-major
      wgmma_rs<Element, kHeadDim, 1>(out, p[step], v_desc + mn_major_offset(step), true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(out);
    __syncthreads();  // every warpgroup is done with `buffer` before tile t + 2 is loaded into it
  }

  cp_async_wait<0>();  // nothing left in flight when no tile was walked
  store_forward_rows<Element, kHeadDim>(g, a, b, h, row0 + warp * kRowsPerWarp, out, row_max, row_sum);
#endif
}


// The warp-specialised forward: one producer warpgroup whose first thread
// copies Q and the key tiles of the row list with the tile copy engine into
// kStages stages, and one consumer warpgroup per 64 query rows that waits
// for a stage, computes S = Q Kᵀ, the online softmax and O += P V, and
// hands the stage back. The consumers never meet at a block-wide barrier:
// one's softmax runs while another's products do.
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
struct PipelinedForward {
  static constexpr int kConsumers = kBlockQ / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  static constexpr int kStages = 2;
  using QTile = SwizzledTile<Element, kBlockQ, kHeadDim>;
  using KeyTile = SwizzledTile<Element, kKeyTile, kHeadDim>;
  struct Shared {
    QTile q;
    KeyTile k[kStages];
    KeyTile v[kStages];
    SharedBarrier q_full, k_full[kStages], v_full[kStages], empty[kStages];
  };
  using ListEntry = uint16_t;  // the row list, after the struct
  static constexpr int64_t kMaxKeyBlocks = 65535;
  static constexpr size_t kSharedPerSm = 228 * 1024, kReservedPerBlock = 1024;
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;  // + the row list at launch
  static constexpr int kBlocksPerSm = 2 * (kSharedBytes + kReservedPerBlock) <= kSharedPerSm && kConsumers == 1 ? 2 : 1;
};

// The producer keeps few registers and the consumers take the rest of the
// SM's share, when that is more than the compiler may give every thread at launch.
template <int kThreads, int kConsumers, int kBlocksPerSm>
struct RegisterSplit {
  static constexpr int kPerSm = 64 * 1024;
  static constexpr int kProducer = 24;
  static constexpr int kConsumer =
      std::min(240, (kPerSm / kBlocksPerSm - kWarpgroupThreads * kProducer) / (kConsumers * kWarpgroupThreads) / 8 * 8);
  static constexpr int kAtLaunch = std::min(255, kPerSm / (kThreads * kBlocksPerSm) / 8 * 8);
  static constexpr bool kHandOver = kAtLaunch < kConsumer;
};

struct ForwardTileMaps {
  RowTileMap q, k, v;
};

template <typename Tile, typename Map>
__device__ __forceinline__ void load_row_tile(Tile& tile, const Map& map, int64_t row, int64_t h, int64_t b,
                                              SharedBarrier& full) {
  static_assert(Tile::kChunkCols == kRowTileBoxCols, "a box is a column chunk");
#pragma unroll
  for (int chunk = 0; chunk < Tile::kChunks; ++chunk)
    tma_load(tile.chunk(chunk), map.map, map.at(chunk * kRowTileBoxCols, row, h, b), full);
}

template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
__global__ void __launch_bounds__(PipelinedForward<Element, kHeadDim, kBlockQ, kKeyTile>::kThreads,
                                  PipelinedForward<Element, kHeadDim, kBlockQ, kKeyTile>::kBlocksPerSm)
    sparse_forward_pipelined_kernel(const __grid_constant__ ForwardTileMaps maps, Geometry g, RoutingPlanView plan,
                                    SparseForwardArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = PipelinedForward<Element, kHeadDim, kBlockQ, kKeyTile>;
  using Shared = typename Config::Shared;
  using QTile = typename Config::QTile;
  using KeyTile = typename Config::KeyTile;
  constexpr int kStages = Config::kStages;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t row0 = m * kBlockQ;
  if (threadIdx.x == 0) {
    s.q_full.init(1);
    for (int stage = 0; stage < kStages; ++stage) {
      s.k_full[stage].init(1);
      s.v_full[stage].init(1);
      s.empty[stage].init(Config::kConsumers * kWarpgroupThreads);
    }
    fence_barrier_init();
  }
  const auto tiles = shared_row_tiles<kKeyTile, Config::kThreads>(
      g, plan, b * g.heads + h, m, reinterpret_cast<typename Config::ListEntry*>(&s + 1));  // ends with a barrier
  const int32_t total = tiles.count();

  if (threadIdx.x < kWarpgroupThreads) {  // the producer
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x != 0 || total == 0) return;
    s.q_full.arrive_expect_bytes(sizeof(QTile));
    load_row_tile(s.q, maps.q, row0, h, b, s.q_full);
    for (int32_t t = 0; t < total; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) s.empty[stage].wait((t / kStages - 1) & 1);  // both consumers are done with tile t - kStages
      s.k_full[stage].arrive_expect_bytes(sizeof(KeyTile));
      load_row_tile(s.k[stage], maps.k, tiles.first(t), kv, b, s.k_full[stage]);
      s.v_full[stage].arrive_expect_bytes(sizeof(KeyTile));
      load_row_tile(s.v[stage], maps.v, tiles.first(t), kv, b, s.v_full[stage]);
    }
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const float scale_log2 = a.scale * kLog2e;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  float out[kHeadDim / 8][4] = {};
  if (total > 0) s.q_full.wait(0);
  for (int32_t t = 0; t < total; ++t) {
    const int stage = t % kStages;
    const uint32_t parity = (t / kStages) & 1;
    const int64_t first = tiles.first(t), end = tiles.end(t);

    s.k_full[stage].wait(parity);
    uint64_t q_desc = k_major_descriptor(s.q), k_desc = k_major_descriptor(s.k[stage]);
    opaque(q_desc);
    float score[kKeyTile / 8][4];
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kHeadDim / 16; ++step) {  // S = Q Kᵀ, 16 head dims a step
      wgmma_ss<Element, kKeyTile, 0, 0>(score, q_desc + k_major_offset<QTile>(warpgroup_row0, step),
                                        k_desc + k_major_offset<KeyTile>(0, step), step > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(score);

    online_softmax_step<KeyMask::partial_tiles>(score, out, row_max, row_sum, first, end, scale_log2);

    uint32_t p[kKeyTile / 16][4];
    accumulators_to_fragments<Element, kKeyTile>(score, p);
    s.v_full[stage].wait(parity);
    uint64_t v_desc = mn_major_descriptor(s.v[stage]);
    opaque(v_desc);
    fence_accumulators(out);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kKeyTile / 16; ++step)  // O += P V, 16 keys a step; V is read N-major
      wgmma_rs<Element, kHeadDim, 1>(out, p[step], v_desc + mn_major_offset(step), true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(out);
    s.empty[stage].arrive();
  }
  store_forward_rows<Element, kHeadDim>(g, a, b, h, row0 + consumer_thread / kWarpSize * kRowsPerWarp, out, row_max,
                                        row_sum);
#endif
}

}  // namespace

bool sparse_forward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                          cudaStream_t stream) {
  bool launched = false;
  const dim3 grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, KT = decltype(block_k)::value;
    const auto kernel = sparse_forward_wgmma_kernel<Element, D, BQ, KT>;  // key tiles of a whole block
    static const bool available = loaded_for_hopper(kernel);
    if (!available) return;
    const size_t shared = wgmma_forward_shared_bytes<Element, D, BQ, KT>() + g.k_blocks * sizeof(int32_t);
    if (shared > max_shared_per_block()) return;  // a row list this long: the mma.sync mainloop serves it
    launch_with_shared(kernel, grid, wgmma_forward_threads<BQ>(), shared, stream, g, plan, args);
    launched = true;
  });
  if (launched) SLATTN_LAUNCH_CHECK("sparse_forward_wgmma_kernel");
  return launched;
}

bool sparse_forward_pipelined(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                              cudaStream_t stream) {
  bool launched = false;
  const dim3 grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, KT = decltype(block_k)::value;
    using Config = PipelinedForward<Element, D, BQ, KT>;
    const auto kernel = sparse_forward_pipelined_kernel<Element, D, BQ, KT>;
    static const bool available = loaded_for_hopper(kernel);
    if (!available || g.k_blocks > Config::kMaxKeyBlocks) return;
    const size_t shared = Config::kSharedBytes + g.k_blocks * sizeof(typename Config::ListEntry);
    if (shared > max_shared_per_block()) return;
    ForwardTileMaps maps;
    if (!make_row_tile_map(args.q, BQ, &maps.q) || !make_row_tile_map(args.k, KT, &maps.k) ||
        !make_row_tile_map(args.v, KT, &maps.v))
      return;  // a layout the copy engine cannot describe: the cp.async mainloops serve it
    launch_with_shared(kernel, grid, Config::kThreads, shared, stream, maps, g, plan, args);
    launched = true;
  });
  if (launched) SLATTN_LAUNCH_CHECK("sparse_forward_pipelined_kernel");
  return launched;
}

}  // namespace slattn::cuda
