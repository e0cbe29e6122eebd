// The key side of the linear backward on Hopper (linear_backward_wgmma.h):
// dh_n, summed over the query blocks whose U_m holds n and over the GQA
// group's query heads, is one product of the linear set's indicator with the
// query kernel's dH_m (linear_set_states.h); then one warp-specialised,
// persistent kernel over the key blocks. Its producer thread copies per key
// block V_n, φ(K_n) and dh_n; each consumer warpgroup (64 keys) issues
// dK = V dh_nᵀ and dV = φ(K) dh_n. dKφ + dz_n goes through φ, and dk, dv get
// the sparse branch's rows added. Built for sm_90a only.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_backward_wgmma.h"
#include "cuda/linear_set_states.h"
#include "cuda/linear_set_products.cuh"
#include "cuda/linear_tiles.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

// The shape of the kernel: warpgroups, stages, shared memory, thread blocks per SM.
template <typename Element, int kHeadDim, int kBlockK>
struct WgmmaKeyGrads {
  static constexpr int kConsumers = kBlockK / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  using KTile = SwizzledTile<Element, kBlockK, kHeadDim>;       // V_n or φ(K_n)
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;  // dh_n (F x D)
  struct Shared {
    KTile v;
    KTile phi;
    StateTile dh;  // the B of the item's two products
    ItemStages<1> item;
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

struct KeyGradMaps {
  RowTileMap v;       // boxes of block_k rows
  RowTileMap phi_k;   // likewise
  RowTileMap dh;      // dh_n as (1, kv pairs * key_blocks_padded, F, D): boxes of whole states
};

template <typename Element>
struct KeyGradKernelArgs {
  FeatureMap feature_map;
  int64_t dh_pair_tiles;  // dh_n tiles per kv pair
  const float* dz_key;    // dz_n per key block
  const float* dk_rows;
  const float* dv_rows;
  DeviceView<Element> dk, dv;
};

template <typename Element, int kHeadDim, int kBlockK>
__global__ void __launch_bounds__(WgmmaKeyGrads<Element, kHeadDim, kBlockK>::kThreads,
                                  WgmmaKeyGrads<Element, kHeadDim, kBlockK>::kBlocksPerSm)
    linear_key_grads_wgmma_kernel(const __grid_constant__ KeyGradMaps maps, Geometry g, KeyGradKernelArgs<Element> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaKeyGrads<Element, kHeadDim, kBlockK>;
  using Shared = typename Config::Shared;
  using KTile = typename Config::KTile;
  using StateTile = typename Config::StateTile;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  constexpr int kTiles = kHeadDim / 8;  // accumulator tiles of a row
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  const int64_t items = g.kv_pairs() * g.k_blocks;

  if (threadIdx.x == 0) s.item.init(Config::kConsumers * kWarpgroupThreads);
  __syncthreads();
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first thread
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x != 0) return;
    produce_whole_items(s.item, items, [&](int64_t item, int, SharedBarrier& full) {
      const int64_t kv_pair = item / g.k_blocks, n = item % g.k_blocks;
      const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
      full.arrive_expect_bytes(2 * sizeof(KTile) + sizeof(StateTile));
      load_row_tile(s.v, maps.v, n * kBlockK, kv, b, full);
      load_row_tile(s.phi, maps.phi_k, n * kBlockK, kv, b, full);
      load_row_tile(s.dh, maps.dh, 0, kv_pair * a.dh_pair_tiles + n, 0, full);
    });
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const int quad = threadIdx.x % 4;
  // The thread's first key row of the tiles (its second is 8 below), as in the accumulators.
  const int tile_row = consumer_thread / kWarpSize * kRowsPerWarp + threadIdx.x % kWarpSize / 4;
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const int64_t kv_pair = item / g.k_blocks, n = item % g.k_blocks;
    const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
    s.item.wait_full(use);
    float dk[kTiles][4] = {};  // V dh_nᵀ
    float dv[kTiles][4] = {};  // φ(K) dh_n
    fence_accumulators(dk);  // zeroed before the products read them: else ptxas serialises the products
    fence_accumulators(dv);
    wgmma_fence();
    issue_rows_times<1, StateRead::transposed>(dk, s.v, s.dh, warpgroup_row0);
    issue_rows_times<1, StateRead::as_stored>(dv, s.phi, s.dh, warpgroup_row0);
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
    s.item.release(use);  // every read of V, φ(K) and dh_n is complete

    const int64_t key0 = n * kBlockK + tile_row;  // the thread's first key; the second is 8 on
    // dv = the sparse branch's dv rows + φ(K) dh_n, in the output dtype.
    store_sum_with_rows(a.dv, b, kv, key0, g.k_len, a.dv_rows + (kv_pair * g.k_rows() + key0) * kHeadDim + 2 * quad,
                        kHeadDim, dv);

    // dKφ = V dh_nᵀ + dz_n, through φ into dk.
    add_to_every_row(dk, a.dz_key + item * kHeadDim + 2 * quad);
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
  o.dh_low = carver.take<unsigned char>(elements(g.kv_pairs() * set_rows_padded(g) * g.features * g.dim));
  o.dz_key = carver.take<float>(g.kv_pairs() * g.k_blocks * g.features);
  return o;
}

KeyGradLinearTerms linear_key_terms_wgmma(const Geometry& g, const RoutingPlanView& plan, DType dtype,
                                          FeatureMap feature_map, LinearScope scope, const LinearSetOperands& set,
                                          const LinearKeyGradOperands& operands, const LinearKeyGradArgs& args,
                                          cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "linear_key_terms_wgmma: fixed feature maps only");
  void* dh_key = set.block_h;  // h_n was read only to form H_m, before: dh_n takes its room (and padding)
  sum_key_set_grads(g, dtype, set.indicator, operands.dh_low, dh_key, set.cublas_workspace, stream);
  key_block_dz(g, plan, scope, args.dz_query, args.dz_total, operands.dz_key, stream);
  return KeyGradLinearTerms{feature_map, operands.phi_k, dh_key, key_blocks_padded(g), operands.dz_key, args.dk,
                            args.dv};
}

bool key_term_maps(const Geometry& g, DType dtype, const KeyGradLinearTerms& terms, RowTileMap* phi_k,
                   RowTileMap* dh) {
  void* phi_rows = const_cast<void*>(terms.phi_k);
  void* dh_tiles = const_cast<void*>(terms.dh_key);
  return make_row_tile_map(dense_rows(phi_rows, dtype, g.batch, g.kv_heads, g.k_len, g.features),
                           static_cast<int>(g.block_k), phi_k) &&
         make_row_tile_map(dense_rows(dh_tiles, dtype, 1, g.kv_pairs() * terms.dh_pair_tiles, g.features, g.dim),
                           static_cast<int>(g.features), dh);
}

const char* linear_key_grads_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& v,
                                   FeatureMap feature_map, LinearScope scope, const LinearSetOperands& set,
                                   const LinearKeyGradOperands& operands, const LinearKeyGradArgs& args,
                                   cudaStream_t stream) {
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
    KeyGradMaps maps{};
    if (!make_row_tile_map(v, BK, &maps.v)) {
      refusal = "v's rows do not suit the tile copy engine";
      return;
    }
    const KeyGradLinearTerms terms =
        linear_key_terms_wgmma(g, plan, v.dtype, feature_map, scope, set, operands, args, stream);
    SLATTN_CHECK(key_term_maps(g, v.dtype, terms, &maps.phi_k, &maps.dh),
                 "linear_key_grads_wgmma: the tile copy engine refused a workspace buffer");
    const KeyGradKernelArgs<Element> kernel_args{feature_map,
                                                 terms.dh_pair_tiles,
                                                 terms.dz_key,
                                                 args.dk_rows,
                                                 args.dv_rows,
                                                 DeviceView<Element>::of(args.dk),
                                                 DeviceView<Element>::of(args.dv)};
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, kernel_args);
    SLATTN_LAUNCH_CHECK("linear_key_grads_wgmma_kernel");
  });
  return refusal;
}

}  // namespace slattn::cuda
