// The key side of the linear backward on Hopper (linear_backward_wgmma.h):
// one warp-specialised, persistent kernel over the key blocks. Its producer
// warp copies per key block V_n and φ(K_n), then, for each query head of the
// GQA group, the dH tiles of the block's column of the block map
// (LinearSetQueryBlocks): the head's total dH when the query blocks whose U_m
// lacks n are fewer, then those blocks' dH_m (subtracted), or else the blocks
// whose U_m holds n (added); each head's count and sign are announced with
// V_n and φ(K_n). The consumer warpgroups add the tiles up as they come
// (dh_n, summed over the group's heads too: V_n and φ(K_n) are theirs in
// common), in fp32, each thread its share of the units (StateSum), and hand
// each tile straight back; then dh_n, rounded to the input dtype, goes to
// shared memory and each warpgroup (64 keys) issues dK = V dh_nᵀ and
// dV = φ(K) dh_n once: two products per key block instead of two per tile.
// dKφ + dz_n goes through φ, and dk, dv get the sparse branch's rows added.
// Built for sm_90a only.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_backward_wgmma.h"
#include "cuda/linear_set_products.cuh"
#include "cuda/linear_tiles.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

inline constexpr int kMaxGroup = 32;  // query heads per kv head the kernel takes

// The shape of the kernel: warpgroups, stages, shared memory, thread blocks per SM.
template <typename Element, int kHeadDim, int kBlockK>
struct WgmmaKeyGrads {
  static constexpr int kConsumers = kBlockK / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  static constexpr int kStages = 4;
  using KTile = SwizzledTile<Element, kBlockK, kHeadDim>;       // V_n or φ(K_n)
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;  // dH_m or dH (F x D)
  struct Shared {
    KTile v;
    KTile phi;
    StateTile states[kStages];
    StateTile sum;  // dh_n of the item, the B of its two products
    KeyTilePipeline<kStages> pipe;  // a stage's tile on its "keys" barrier; its "values" barriers are unused
    // Per query head of the item's GQA group: its listed dH_m tiles * 2 + whether they are subtracted
    // (from the head's dH, one more tile before them); announced with V_n and φ(K_n).
    int32_t member_lists[kMaxGroup];
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

struct KeyGradMaps {
  RowTileMap v;       // boxes of block_k rows
  RowTileMap phi_k;   // likewise
  RowTileMap dh;      // dh_low as (1, q pairs * Mq + q pairs, F, D): boxes of whole states
};

template <typename Element>
struct KeyGradKernelArgs {
  FeatureMap feature_map;
  LinearScope scope;
  const float* dz_key;  // dz_n per key block
  const float* dk_rows;
  const float* dv_rows;
  DeviceView<Element> dk, dv;
};

template <typename Element, int kHeadDim, int kBlockK>
__global__ void __launch_bounds__(WgmmaKeyGrads<Element, kHeadDim, kBlockK>::kThreads,
                                  WgmmaKeyGrads<Element, kHeadDim, kBlockK>::kBlocksPerSm)
    linear_key_grads_wgmma_kernel(const __grid_constant__ KeyGradMaps maps, Geometry g, RoutingPlanView plan,
                                  KeyGradKernelArgs<Element> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaKeyGrads<Element, kHeadDim, kBlockK>;
  using Shared = typename Config::Shared;
  using KTile = typename Config::KTile;
  using StateTile = typename Config::StateTile;
  // The producer walks the block map: 40 registers would spill.
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm, 56>;
  constexpr int kTiles = kHeadDim / 8;  // accumulator tiles of a row
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  const int64_t items = g.kv_pairs() * g.k_blocks;  // key blocks fastest: the items in flight share dH_m in L2

  if (threadIdx.x == 0) s.pipe.init(Config::kConsumers * kWarpgroupThreads);
  __syncthreads();
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x >= kWarpSize) return;
    const bool leader = threadIdx.x == 0;
    const LinearSetQueryBlocks columns{plan, a.scope};
    int32_t t = 0;  // dH tiles copied so far, over all items (counted on lane 0)
    int32_t use = 0;
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
      const int64_t kv_pair = item / g.k_blocks, n = item % g.k_blocks;
      const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
      const auto q_pair_of = [&](int64_t member) { return b * g.heads + kv * g.group() + member; };
      if (leader && use > 0) s.pipe.q_empty.wait((use - 1) & 1);  // the consumers are done with the last item
      __syncwarp();
      for (int64_t member = 0; member < g.group(); ++member) {
        const BlockListing listing = columns.list(q_pair_of(member) * g.k_blocks + n);
        if (leader) s.member_lists[member] = listing.count * 2 + (listing.complement ? 1 : 0);
      }
      if (leader) {
        s.pipe.q_full.arrive_expect_bytes(2 * sizeof(KTile));
        load_row_tile(s.v, maps.v, n * kBlockK, kv, b, s.pipe.q_full);
        load_row_tile(s.phi, maps.phi_k, n * kBlockK, kv, b, s.pipe.q_full);
      }
      // On lane 0: tile t is dH_m (or dH) number `block` of dh_low.
      const auto copy_tile = [&](int64_t block) {
        const int stage = s.pipe.stage(t);
        SharedBarrier& full = s.pipe.keys_slot(t);
        full.arrive_expect_bytes(sizeof(StateTile));
        load_row_tile(s.states[stage], maps.dh, 0, block, 0, full);
        ++t;
      };
      for (int64_t member = 0; member < g.group(); ++member) {
        const int64_t q_pair = q_pair_of(member), line = q_pair * g.k_blocks + n;
        const BlockListing listing = columns.list(line);
        if (listing.complement && leader) copy_tile(g.q_pairs() * g.q_blocks + q_pair);
        columns.walk(line, listing, [](int32_t) { return 0; },
                     [&](int32_t m, int) { copy_tile(q_pair * g.q_blocks + m); });
      }
    }
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const int quad = threadIdx.x % 4;
  // The thread's first key row of the tiles (its second is 8 below), as in the accumulators.
  const int tile_row = consumer_thread / kWarpSize * kRowsPerWarp + threadIdx.x % kWarpSize / 4;
  int32_t t0 = 0;  // the ring position of this item's first tile
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const int64_t kv_pair = item / g.k_blocks, n = item % g.k_blocks;
    const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
    s.pipe.q_full.wait(use & 1);
    StateSum<StateTile, Config::kConsumers * kWarpgroupThreads> dh;
    for (int64_t member = 0; member < g.group(); ++member) {
      const int32_t listed = s.member_lists[member];
      if (listed & 1)  // the head's dH, less the listed dH_m
        t0 = dh.add_stages(s.pipe, s.states, t0, 1, 1.0f, consumer_thread);
      t0 = dh.add_stages(s.pipe, s.states, t0, listed >> 1, listed & 1 ? -1.0f : 1.0f, consumer_thread);
    }
    // Both warpgroups are done with the last item's products (their epilogue came after them) before
    // the sum replaces its B.
    dh.publish(s.sum, 1, consumer_thread);
    float dk[kTiles][4] = {};  // V dh_nᵀ
    float dv[kTiles][4] = {};  // φ(K) dh_n
    wgmma_fence();
    issue_rows_times<1, StateRead::transposed>(dk, s.v, s.sum, warpgroup_row0);
    issue_rows_times<1, StateRead::as_stored>(dv, s.phi, s.sum, warpgroup_row0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(dk);
    fence_accumulators(dv);

    float phi[kTiles][4];  // φ(K) at the accumulators' places, for the chain rule of dk
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float2 pair_phi = unpack2<Element>(s.phi.accumulator_pair(tile_row + 8 * r, j));
        phi[j][2 * r] = pair_phi.x;
        phi[j][2 * r + 1] = pair_phi.y;
      }
    s.pipe.q_empty.arrive();  // every read of V and φ(K) is complete

    const int64_t key0 = n * kBlockK + tile_row;  // the thread's first key; the second is 8 on
    // dv = the sparse branch's dv rows + φ(K) dh_n, in the output dtype.
    store_sum_with_rows(a.dv, b, kv, key0, g.k_len, a.dv_rows + (kv_pair * g.k_rows() + key0) * kHeadDim + 2 * quad,
                        kHeadDim, dv);

    // dKφ = V dh_nᵀ + dz_n, through φ into dk.
    const float* dz = a.dz_key + item * kHeadDim + 2 * quad;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const float2 dz_pair = *reinterpret_cast<const float2*>(dz + 8 * j);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        dk[j][2 * r] += dz_pair.x;
        dk[j][2 * r + 1] += dz_pair.y;
      }
    }
    feature_map_backward<kHeadDim>(a.feature_map, phi, dk);
    store_sum_with_rows(a.dk, b, kv, key0, g.k_len, a.dk_rows + (kv_pair * g.k_rows() + key0) * kHeadDim + 2 * quad,
                        kHeadDim, dk);  // dk = the sparse branch's dk rows + this
  }
#endif
}

}  // namespace

LinearKeyGradOperands LinearKeyGradOperands::carve(WorkspaceCarver& carver, const Geometry& g, DType dtype) {
  const auto elements = [&](int64_t count) { return count * static_cast<int64_t>(dtype_size(dtype)); };
  LinearKeyGradOperands o;
  o.phi_k = carver.take<unsigned char>(elements(g.kv_pairs() * g.k_len * g.features));
  o.dh_low = carver.take<unsigned char>(elements((g.q_pairs() * g.q_blocks + g.q_pairs()) * g.features * g.dim));
  o.dz_key = carver.take<float>(g.kv_pairs() * g.k_blocks * g.features);
  return o;
}

const char* linear_key_grads_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& v,
                                   FeatureMap feature_map, LinearScope scope, const LinearKeyGradOperands& operands,
                                   const LinearKeyGradArgs& args, cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "linear_key_grads_wgmma: fixed feature maps only");
  const char* refusal = nullptr;
  const int64_t items = g.kv_pairs() * g.k_blocks;
  dispatch_sparse_kernel(v.dtype, g, [&](auto tag, auto head_dim, auto, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BK = decltype(block_k)::value;
    using Config = WgmmaKeyGrads<Element, D, BK>;
    const auto kernel = linear_key_grads_wgmma_kernel<Element, D, BK>;
    static const bool available = loaded_for_hopper(kernel);
    refusal = hopper_kernel_refusal(available, Config::kSharedBytes);
    if (refusal != nullptr) return;
    if (g.group() > kMaxGroup) {
      refusal = "the Hopper linear backward takes at most 32 query heads per kv head";
      return;
    }
    KeyGradMaps maps{};
    if (!make_row_tile_map(v, BK, &maps.v)) {
      refusal = "v's rows do not suit the tile copy engine";
      return;
    }
    const bool packed =
        make_row_tile_map(dense_rows(operands.phi_k, v.dtype, g.batch, g.kv_heads, g.k_len, D), BK, &maps.phi_k) &&
        make_row_tile_map(dense_rows(operands.dh_low, v.dtype, 1, g.q_pairs() * g.q_blocks + g.q_pairs(), D, D), D,
                          &maps.dh);
    SLATTN_CHECK(packed, "linear_key_grads_wgmma: the tile copy engine refused a workspace buffer");

    auto* dh_totals = static_cast<unsigned char*>(operands.dh_low) +
                      g.q_pairs() * g.q_blocks * D * D * static_cast<int64_t>(dtype_size(v.dtype));
    round_to_dtype(args.dh_total, dh_totals, v.dtype, g.q_pairs() * D * D, stream);
    key_block_dz(g, plan, scope, args.dz_query, args.dz_total, operands.dz_key, stream);
    const KeyGradKernelArgs<Element> kernel_args{feature_map,  scope,        operands.dz_key,
                                                 args.dk_rows, args.dv_rows, DeviceView<Element>::of(args.dk),
                                                 DeviceView<Element>::of(args.dv)};
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, plan, kernel_args);
    SLATTN_LAUNCH_CHECK("linear_key_grads_wgmma_kernel");
  });
  return refusal;
}

}  // namespace slattn::cuda
