// Backward of the sparse branch on Hopper (sm_90a): the two deterministic
// kernels of sparse_backward_mma.cu, warp-specialised and persistent as the
// forward (key_tile_pipeline.cuh). A producer warp copies an item's own
// blocks, then the blocks its list names, whole, with the tile copy engine
// into two stages; one consumer warpgroup per 64 rows of the item walks each
// listed block in slices of 64:
//   dQ:    item = a query block (Q, dOs); its row list names key blocks
//          (K, V): S = Q Kᵀ and dP = dOs Vᵀ, dS = P (dP - D), dQ += dS K.
//   dK/dV: item = a key block (K, V); the column lists of every query head
//          of its GQA group name query blocks (Q, dOs, and the rows' LSE and
//          D, copied with them): Sᵀ = K Qᵀ, dPᵀ = V dOsᵀ, dV += Pᵀ dOs,
//          dK += dSᵀ Q.
//          With the linear branch's key-side terms (KeyGradLinearTerms), one
//          more ring entry per key block brings dh_n and φ(K_n): dV +=
//          φ(K_n) dh_n and dK += φ'(V dh_nᵀ + dz_n) before the final dk and dv
//          are stored.
// K in dQ += dS K, and dOs, Q in the dK/dV products, are read MN-major from
// the same swizzled tiles the first products read K-major. Built for sm_90a
// only (see sparse_forward_wgmma.cu); layouts the copy engine cannot
// describe go to the mma.sync kernels.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_backward_wgmma.h"
#include "cuda/linear_set_products.cuh"
#include "cuda/linear_tiles.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_backward_steps.cuh"
#include "cuda/sparse_mainloops.h"
#include "cuda/tensor_map.h"
#include "cuda/tile_mma.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kSlice = 64;  // keys (dQ) or queries (dK/dV) of a listed block per step
using SliceAccumulators = float[kSlice / 8][4];
using SliceFragments = uint32_t[kSlice / 16][4];

// The shape of both kernels: a producer warpgroup (one warp of it copies),
// an item of kItemRows rows (one consumer warpgroup per 64), listed blocks of
// kListedRows rows in two stages. The producer keeps 40 registers, so that
// two consumers get 232 each (RegisterSplit): the dK and dV accumulators need
// them (which also holds a dK/dV block to one per SM).
template <typename Element, int kDim, int kItemRows, int kListedRows, int kMaxBlocksPerSm>
struct WgmmaBackward {
  static constexpr int kHeadDim = kDim;
  static constexpr int kConsumers = kItemRows / kWarpgroupRows;
  static constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
  static constexpr int kThreads = kWarpgroupThreads + kConsumerThreads;
  static constexpr int kStages = 2;
  static constexpr int kSlices = kListedRows / kSlice;
  static_assert(kSlices * kSlice == kListedRows, "listed blocks of whole slices");
  using ItemTile = SwizzledTile<Element, kItemRows, kHeadDim>;
  using ListedTile = SwizzledTile<Element, kListedRows, kHeadDim>;
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;  // dh_n (dK/dV with the linear terms)
  // A listed query block's LSE (log2 units, +inf on pad rows) and D, for dK/dV.
  struct alignas(16) RowStats {
    float lse_log2[kListedRows];
    float delta[kListedRows];
  };
  struct Shared {
    ItemTile own[2];  // Q and dOs (dQ), or K and V (dK/dV)
    ListedTile first[kStages], second[kStages];  // K and V (dQ), or Q and dOs (dK/dV)
    RowStats stats[kStages];  // dK/dV only
    KeyTilePipeline<kStages> pipe;
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;  // aligned to the swizzle atom at run time
  static constexpr int kBlocksPerSm = std::min(kMaxBlocksPerSm, blocks_per_sm(kSharedBytes, kConsumers));
  using Registers = RegisterSplit<kThreads, kConsumers, kBlocksPerSm>;
};
// dK/dV with the linear terms: the ring entry after a key block's listed
// query blocks holds dh_n in its first tile and φ(K_n) in its second.
template <typename Config>
constexpr bool holds_linear_terms() {
  return sizeof(typename Config::StateTile) <= sizeof(typename Config::ListedTile) &&
         sizeof(typename Config::ItemTile) <= sizeof(typename Config::ListedTile);
}

template <typename Element, int kHeadDim, int kBlockQ, int kBlockK>
using QueryGrads = WgmmaBackward<Element, kHeadDim, kBlockQ, kBlockK, 2>;
template <typename Element, int kHeadDim, int kBlockQ, int kBlockK>
using KeyGrads = WgmmaBackward<Element, kHeadDim, kBlockK, kBlockQ, 1>;

// The maps both kernels read their operands through; phi_k and dh (boxes of
// whole dh_n) with the linear terms.
struct BackwardTileMaps {
  RowTileMap q, k, v, dos, phi_k, dh;
};

// What the dK/dV kernel's producer copies of KeyGradLinearTerms; `add` false: none.
struct KeyLinearTiles {
  bool add = false;
  int64_t dh_pair_tiles = 0;
  const float* dz_key = nullptr;
};

// KeyGradLinearTerms as the dK/dV kernel reads them.
template <typename Element>
struct KeyLinearArgs {
  KeyLinearTiles tiles;
  FeatureMap feature_map = FeatureMap::elu;
  DeviceView<Element> dk, dv;
};

// acc (64 x kSlice) = A · Bᵀ over kHeadDim: A the warpgroup's 64 rows of a
// K-major tile from `a_row`, B the kSlice rows of a K-major tile from `b_row`.
template <typename Element, int kHeadDim, typename TileA, typename TileB>
__device__ __forceinline__ void issue_slice_scores(SliceAccumulators& acc, const TileA& a, int a_row, const TileB& b,
                                                   int b_row) {
  uint64_t a_desc = k_major_descriptor(a);
  opaque(a_desc);
  const uint64_t b_desc = k_major_descriptor(b);
#pragma unroll
  for (int step = 0; step < kHeadDim / 16; ++step)
    wgmma_ss<Element, kSlice, 0, 0>(acc, a_desc + k_major_offset<TileA>(a_row, step),
                                    b_desc + k_major_offset<TileB>(b_row, step), step > 0);
}

// acc (64 x kHeadDim) += P · B: P (64 x kSlice) as A fragments, B slice
// `slice` (kSlice rows) of a tile read MN-major.
template <typename Element, int kHeadDim, typename TileB>
__device__ __forceinline__ void issue_slice_times(float (&acc)[kHeadDim / 8][4], const SliceFragments& p,
                                                  const TileB& b, int slice) {
  uint64_t b_desc = mn_major_descriptor(b);
  opaque(b_desc);
#pragma unroll
  for (int step = 0; step < kSlice / 16; ++step)
    wgmma_rs<Element, kHeadDim, 1>(acc, p[step], b_desc + mn_major_offset(slice * (kSlice / 16) + step), true);
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

// grid: persistent over query blocks; dQ of one query block per item.
template <typename Element, int kHeadDim, int kBlockQ, int kBlockK>
__global__ void __launch_bounds__(QueryGrads<Element, kHeadDim, kBlockQ, kBlockK>::kThreads,
                                  QueryGrads<Element, kHeadDim, kBlockQ, kBlockK>::kBlocksPerSm)
    sparse_dq_wgmma_kernel(const __grid_constant__ BackwardTileMaps maps, Geometry g, RoutingPlanView plan,
                           SparseBackwardArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = QueryGrads<Element, kHeadDim, kBlockQ, kBlockK>;
  extern __shared__ unsigned char raw[];
  auto& s = *reinterpret_cast<typename Config::Shared*>(align_shared(raw, kSwizzleAtomBytes));
  auto &q = s.own[0], &dos = s.own[1];
  auto &k = s.first, &v = s.second;

  if (threadIdx.x == 0) s.pipe.init(Config::kConsumerThreads);
  __syncthreads();
  using Registers = typename Config::Registers;
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x >= kWarpSize) return;
    produce_items(
        s.pipe, g, plan,
        [&](const QueryItem& at, SharedBarrier& full) {
          full.arrive_expect_bytes(2 * sizeof(typename Config::ItemTile));
          load_row_tile(q, maps.q, at.m * kBlockQ, at.h, at.b, full);
          load_row_tile(dos, maps.dos, at.m * kBlockQ, at.h, at.b, full);
        },
        [](const QueryItem&, int32_t) { return 0; },
        [&](int stage, const QueryItem& at, int32_t n, int, SharedBarrier& full) {
          full.arrive_expect_bytes(sizeof(typename Config::ListedTile));
          load_row_tile(k[stage], maps.k, n * kBlockK, at.h / g.group(), at.b, full);
        },
        [&](int stage, const QueryItem& at, int32_t n, SharedBarrier& full) {
          full.arrive_expect_bytes(sizeof(typename Config::ListedTile));
          load_row_tile(v[stage], maps.v, n * kBlockK, at.h / g.group(), at.b, full);
        });
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const int local0 = consumer_thread / kWarpSize * kRowsPerWarp;  // the warp's first row of the block
  const float scale_log2 = a.scale * kLog2e;
  int32_t t0 = 0;  // the ring position of this item's first key block
  int32_t use = 0;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    const int64_t padded0 = (at.b * g.heads + at.h) * g.q_rows() + at.m * kBlockQ + local0;
    float lse_log2[2], delta[2];  // of the thread's two rows, read before the wait
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lse_log2[r] = a.lse_log2_rows[padded0 + accumulator_row(2 * r)];
      delta[r] = a.delta[padded0 + accumulator_row(2 * r)];
    }
    s.pipe.q_full.wait(use & 1);
    const int32_t total = s.pipe.item_tiles;
    float dq[kHeadDim / 8][4] = {};
    for (int32_t t = t0; t < t0 + total; ++t) {
      const int stage = s.pipe.stage(t);
      s.pipe.wait_keys(t);
      s.pipe.wait_values(t);
      const int64_t block_first = s.pipe.tile_first[stage];
#pragma unroll 1
      for (int slice = 0; slice < Config::kSlices; ++slice) {
        SliceAccumulators p, ds;
        run_products(
            [&] {
              issue_slice_scores<Element, kHeadDim>(p, q, warpgroup_row0, k[stage], slice * kSlice);     // S
              issue_slice_scores<Element, kHeadDim>(ds, dos, warpgroup_row0, v[stage], slice * kSlice);  // dP
            },
            p, ds);
        score_grads(p, ds, block_first + slice * kSlice, g.k_len, scale_log2, lse_log2, delta);
        SliceFragments ds_fragments;
        accumulators_to_fragments<Element, kSlice>(ds, ds_fragments);
        run_products([&] { issue_slice_times<Element, kHeadDim>(dq, ds_fragments, k[stage], slice); }, dq);
      }
      s.pipe.release_keys(t);
      s.pipe.release_values(t);
    }
    s.pipe.q_empty.arrive();  // every product that reads Q and dOs is complete
    t0 += total;
    // Every row of the block, pad rows included (their P is 0: dQ is 0 there).
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        accumulator_pair(a.dq_rows + padded0 * kHeadDim, kHeadDim, j, r) =
            make_float2(a.scale * dq[j][2 * r], a.scale * dq[j][2 * r + 1]);
    }
  }
#endif
}

// The producer warp of the dK/dV kernel: per item, K and V of the key block
// (announced with the item's count of listed query blocks), then for each
// query head of the group and each query block of its column list, once a
// stage is free, Q with the block's LSE and D rows (one barrier) and dOs
// (the other).
// With the linear terms (linear.add), each item is followed by one more ring
// entry, dh_n and dz_n (in the stage's row statistics) on its "queries"
// barrier and φ(K_n) on the other, and K and V are copied even for a key
// block no query block chose.
template <typename Config>
__device__ __forceinline__ void produce_key_items(typename Config::Shared& s, const BackwardTileMaps& maps,
                                                  const Geometry& g, const RoutingPlanView& plan,
                                                  const SparseBackwardArgs& a, const KeyLinearTiles& linear) {
  constexpr int kBlockK = Config::kConsumers * kWarpgroupRows;
  constexpr int kBlockQ = Config::kSlices * kSlice;
  constexpr uint32_t kStatsBytes = kBlockQ * sizeof(float);
  const bool leader = threadIdx.x % kWarpSize == 0;
  const int64_t items = g.k_blocks * g.kv_heads * g.batch;
  int32_t t = 0;  // query blocks copied so far, over all items
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const KeyItem at = KeyItem::of(item, g);
    auto column_of = [&](int64_t member) { return (at.b * g.heads + at.kv * g.group() + member) * g.k_blocks + at.n; };
    int32_t listed = 0;
    for (int64_t member = 0; member < g.group(); ++member) listed += plan.col_count[column_of(member)];
    if (leader) {
      if (use > 0) s.pipe.q_empty.wait((use - 1) & 1);  // the consumers are done with the last item's K and V
      s.pipe.item_tiles = listed;
      if (listed > 0 || linear.add) {
        s.pipe.q_full.arrive_expect_bytes(2 * sizeof(typename Config::ItemTile));
        load_row_tile(s.own[0], maps.k, at.n * kBlockK, at.kv, at.b, s.pipe.q_full);
        load_row_tile(s.own[1], maps.v, at.n * kBlockK, at.kv, at.b, s.pipe.q_full);
      } else {
        s.pipe.q_full.arrive();
      }
    }
    for (int64_t member = 0; member < g.group(); ++member) {
      const int64_t column = column_of(member);
      const int64_t h = at.kv * g.group() + member, pair = at.b * g.heads + h;
      walk_row_list(
          plan.col_index + column * g.q_blocks, plan.col_count[column], [](int32_t) { return 0; },
          [&](int32_t m, int) {
            const int stage = s.pipe.stage(t);
            const int64_t padded = pair * g.q_rows() + m * int64_t(kBlockQ);
            SharedBarrier& queries = s.pipe.keys_slot(t);
            queries.arrive_expect_bytes(sizeof(typename Config::ListedTile) + 2 * kStatsBytes);
            load_row_tile(s.first[stage], maps.q, m * kBlockQ, h, at.b, queries);
            bulk_load(s.stats[stage].lse_log2, a.lse_log2_rows + padded, kStatsBytes, queries);
            bulk_load(s.stats[stage].delta, a.delta + padded, kStatsBytes, queries);
            SharedBarrier& gradients = s.pipe.values_slot(t);
            gradients.arrive_expect_bytes(sizeof(typename Config::ListedTile));
            load_row_tile(s.second[stage], maps.dos, m * kBlockQ, h, at.b, gradients);
            ++t;
          });
    }
    if constexpr (holds_linear_terms<Config>()) {
      if (linear.add && leader) {
        constexpr uint32_t kDzBytes = Config::kHeadDim * sizeof(float);
        static_assert(sizeof(s.stats[0].lse_log2) >= kDzBytes, "dz_n fits a stage's row statistics");
        const int stage = s.pipe.stage(t);
        const int64_t kv_pair = at.b * g.kv_heads + at.kv;
        auto& dh = *reinterpret_cast<typename Config::StateTile*>(&s.first[stage]);
        auto& phi_k = *reinterpret_cast<typename Config::ItemTile*>(&s.second[stage]);
        SharedBarrier& states = s.pipe.keys_slot(t);
        states.arrive_expect_bytes(sizeof(dh) + kDzBytes);
        load_row_tile(dh, maps.dh, 0, kv_pair * linear.dh_pair_tiles + at.n, 0, states);
        bulk_load(s.stats[stage].lse_log2, linear.dz_key + (kv_pair * g.k_blocks + at.n) * Config::kHeadDim, kDzBytes,
                  states);
        SharedBarrier& features = s.pipe.values_slot(t);
        features.arrive_expect_bytes(sizeof(phi_k));
        load_row_tile(phi_k, maps.phi_k, at.n * kBlockK, at.kv, at.b, features);
      }
      if (linear.add) ++t;
    }
  }
}

// The dK/dV kernel's end of an item with the linear terms: ring entry t
// holds dh_n and φ(K_n) (produce_key_items); dk and dv hold the sparse
// branch's sums (dk before its scale). Stores the final dv, then dk, at the
// thread's rows `row` and row + 8 of the block (`key` the first one's index
// in the sequence); hands back K and V once V's last product is complete.
template <typename Config, typename Element, int kTiles>
__device__ __forceinline__ void store_with_linear_terms(typename Config::Shared& s, int32_t t, const KeyItem& at,
                                                        int warpgroup_row0, int row, int64_t key, const Geometry& g,
                                                        float scale, const KeyLinearArgs<Element>& linear,
                                                        float (&dk)[kTiles][4], float (&dv)[kTiles][4]) {
  constexpr int kHeadDim = kTiles * 8;
  const int stage = s.pipe.stage(t);
  s.pipe.wait_keys(t);
  s.pipe.wait_values(t);
  const auto& dh = *reinterpret_cast<const typename Config::StateTile*>(&s.first[stage]);
  const auto& phi_k = *reinterpret_cast<const typename Config::ItemTile*>(&s.second[stage]);
  const auto& v = s.own[1];
  float dk_phi[kTiles][4] = {};  // V dh_nᵀ
  run_products(
      [&] {
        issue_rows_times<1, StateRead::transposed>(dk_phi, v, dh, warpgroup_row0);
        issue_rows_times<1, StateRead::as_stored>(dv, phi_k, dh, warpgroup_row0);
      },
      dk_phi, dv);
  s.pipe.q_empty.arrive();  // every product that reads K and V is complete: the next item's copies may start
  store_accumulator_rows(linear.dv, at.b, at.kv, key, g.k_len, dv);
  add_to_every_row(dk_phi, s.stats[stage].lse_log2 + 2 * (threadIdx.x % 4));  // dz_n
  // φ(K) read where the chain rule needs it, not held: dk, dKφ and φ at once would not fit the registers.
  const auto phi_at = [&](int j, int e) {
    const float2 pair = unpack2<Element>(phi_k.accumulator_pair(row + 8 * (e / 2), j));
    return e % 2 == 0 ? pair.x : pair.y;
  };
  feature_map_backward_at<kHeadDim>(linear.feature_map, phi_at, dk_phi);
  s.pipe.release_keys(t);
  s.pipe.release_values(t);
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_phi[j][e] += scale * dk[j][e];
  store_accumulator_rows(linear.dk, at.b, at.kv, key, g.k_len, dk_phi);
}

// grid: persistent over key blocks; dK and dV of one key block per item.
template <typename Element, int kHeadDim, int kBlockQ, int kBlockK>
__global__ void __launch_bounds__(KeyGrads<Element, kHeadDim, kBlockQ, kBlockK>::kThreads,
                                  KeyGrads<Element, kHeadDim, kBlockQ, kBlockK>::kBlocksPerSm)
    sparse_dkv_wgmma_kernel(const __grid_constant__ BackwardTileMaps maps, Geometry g, RoutingPlanView plan,
                            SparseBackwardArgs a, KeyLinearArgs<Element> linear) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = KeyGrads<Element, kHeadDim, kBlockQ, kBlockK>;
  extern __shared__ unsigned char raw[];
  auto& s = *reinterpret_cast<typename Config::Shared*>(align_shared(raw, kSwizzleAtomBytes));
  auto &k = s.own[0], &v = s.own[1];
  auto &q = s.first, &dos = s.second;

  if (threadIdx.x == 0) s.pipe.init(Config::kConsumerThreads);
  __syncthreads();
  using Registers = typename Config::Registers;
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x < kWarpSize) produce_key_items<Config>(s, maps, g, plan, a, linear.tiles);
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const int local0 = consumer_thread / kWarpSize * kRowsPerWarp;  // the warp's first key of the block
  const float scale_log2 = a.scale * kLog2e;
  int32_t t0 = 0;  // the ring position of this item's first query block
  int32_t use = 0;
  const int64_t items = g.k_blocks * g.kv_heads * g.batch;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const KeyItem at = KeyItem::of(item, g);
    s.pipe.q_full.wait(use & 1);
    const int32_t total = s.pipe.item_tiles;
    float dk[kHeadDim / 8][4] = {}, dv[kHeadDim / 8][4] = {};
    for (int32_t t = t0; t < t0 + total; ++t) {
      const int stage = s.pipe.stage(t);
      s.pipe.wait_keys(t);
      s.pipe.wait_values(t);
#pragma unroll 1
      for (int slice = 0; slice < Config::kSlices; ++slice) {
        SliceAccumulators pt, dst;
        run_products(
            [&] {
              issue_slice_scores<Element, kHeadDim>(pt, k, warpgroup_row0, q[stage], slice * kSlice);      // Sᵀ
              issue_slice_scores<Element, kHeadDim>(dst, v, warpgroup_row0, dos[stage], slice * kSlice);  // dPᵀ
            },
            pt, dst);
        score_grads_transposed(pt, dst, scale_log2, s.stats[stage].lse_log2 + slice * kSlice,
                               s.stats[stage].delta + slice * kSlice);
        SliceFragments pt_fragments, dst_fragments;
        accumulators_to_fragments<Element, kSlice>(pt, pt_fragments);
        accumulators_to_fragments<Element, kSlice>(dst, dst_fragments);
        run_products(
            [&] {
              issue_slice_times<Element, kHeadDim>(dv, pt_fragments, dos[stage], slice);
              issue_slice_times<Element, kHeadDim>(dk, dst_fragments, q[stage], slice);
            },
            dv, dk);
      }
      s.pipe.release_keys(t);
      s.pipe.release_values(t);
    }
    const int64_t key0 = at.n * kBlockK + local0;
    if constexpr (holds_linear_terms<Config>()) {
      if (linear.tiles.add) {
        const int row = local0 + accumulator_row(0);
        store_with_linear_terms<Config>(s, t0 + total, at, warpgroup_row0, row, at.n * kBlockK + row, g, a.scale,
                                        linear, dk, dv);
        t0 += total + 1;
        continue;
      }
    }
    s.pipe.q_empty.arrive();  // every product that reads K and V is complete
    t0 += total;
    const int64_t warp_rows = ((at.b * g.kv_heads + at.kv) * g.k_rows() + key0) * kHeadDim;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool valid = key0 + accumulator_row(2 * r) < g.k_len;  // pad rows get zeros
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        accumulator_pair(a.dk_rows + warp_rows, kHeadDim, j, r) =
            valid ? make_float2(a.scale * dk[j][2 * r], a.scale * dk[j][2 * r + 1]) : make_float2(0.0f, 0.0f);
        accumulator_pair(a.dv_rows + warp_rows, kHeadDim, j, r) =
            valid ? make_float2(dv[j][2 * r], dv[j][2 * r + 1]) : make_float2(0.0f, 0.0f);
      }
    }
  }
#endif
}

// The padded dOs rows of the workspace as the (B, H, q_rows, D) tensor the copy engine reads.
TensorView dos_rows_view(const Geometry& g, const SparseBackwardArgs& args) {
  TensorView view;
  view.data = args.dos_rows;
  view.dtype = args.q.dtype;
  view.size = {g.batch, g.heads, g.q_rows(), g.dim};
  view.stride = {g.heads * g.q_rows() * g.dim, g.q_rows() * g.dim, g.dim, 1};
  return view;
}

}  // namespace

const char* sparse_backward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                                  const KeyGradLinearStep& between, bool* terms_added, cudaStream_t stream) {
  const char* refusal = nullptr;
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, BK = decltype(block_k)::value;
    using QueryConfig = QueryGrads<Element, D, BQ, BK>;
    using KeyConfig = KeyGrads<Element, D, BQ, BK>;
    const auto dq_kernel = sparse_dq_wgmma_kernel<Element, D, BQ, BK>;
    const auto dkv_kernel = sparse_dkv_wgmma_kernel<Element, D, BQ, BK>;
    static const bool available = loaded_for_hopper(dq_kernel) && loaded_for_hopper(dkv_kernel);
    refusal = hopper_kernel_refusal(available, std::max(QueryConfig::kSharedBytes, KeyConfig::kSharedBytes));
    if (refusal != nullptr) return;
    // Whole blocks: the same maps serve both kernels. Without a gradient of Os, dOs is dO: the copy engine
    // reads the caller's tensor (zero past the sequence, as the padded rows are) and its rows are not
    // written.
    BackwardTileMaps maps;
    const bool dos_is_dout = !args.dout_sparse.defined() && make_row_tile_map(args.dout, BQ, &maps.dos);
    if (!make_row_tile_map(args.q, BQ, &maps.q) ||
        (!dos_is_dout && !make_row_tile_map(dos_rows_view(g, args), BQ, &maps.dos)) ||
        !make_row_tile_map(args.k, BK, &maps.k) || !make_row_tile_map(args.v, BK, &maps.v)) {
      refusal = "the Hopper backward copies q, k and v with the tile copy engine, which needs each to have a "
                "contiguous head dim, a 16-byte-aligned start and strides that are multiples of 16 bytes";
      return;
    }
    SparseBackwardArgs delta_args = args;
    if (dos_is_dout) delta_args.dos_rows = nullptr;
    sparse_delta(g, delta_args, stream);
    const auto sms = static_cast<int64_t>(multiprocessor_count());
    const auto dq_grid = static_cast<unsigned>(
        std::min<int64_t>(g.q_blocks * g.heads * g.batch, sms * QueryConfig::kBlocksPerSm));
    launch_with_shared(dq_kernel, dq_grid, QueryConfig::kThreads, QueryConfig::kSharedBytes, stream, maps, g, plan,
                       args);
    SLATTN_LAUNCH_CHECK("sparse_dq_wgmma_kernel");
    const KeyGradLinearTerms* terms = between ? between(holds_linear_terms<KeyConfig>()) : nullptr;
    SLATTN_CHECK(terms == nullptr || holds_linear_terms<KeyConfig>(),
                 "sparse_backward_wgmma: linear terms for a dK/dV kernel that cannot hold them");
    KeyLinearArgs<Element> linear;
    if (terms != nullptr) {
      SLATTN_CHECK(key_term_maps(g, args.q.dtype, *terms, &maps.phi_k, &maps.dh),
                   "sparse_backward_wgmma: the tile copy engine refused a workspace buffer");
      linear = {{true, terms->dh_pair_tiles, terms->dz_key}, terms->feature_map, DeviceView<Element>::of(terms->dk),
                DeviceView<Element>::of(terms->dv)};
    }
    *terms_added = terms != nullptr;
    const auto dkv_grid = static_cast<unsigned>(
        std::min<int64_t>(g.k_blocks * g.kv_heads * g.batch, sms * KeyConfig::kBlocksPerSm));
    launch_with_shared(dkv_kernel, dkv_grid, KeyConfig::kThreads, KeyConfig::kSharedBytes, stream, maps, g, plan, args,
                       linear);
    SLATTN_LAUNCH_CHECK("sparse_dkv_wgmma_kernel");
  });
  return refusal;
}

}  // namespace slattn::cuda
