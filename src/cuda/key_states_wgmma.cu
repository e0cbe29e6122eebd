// The key-block states on Hopper (key_states_wgmma.h). A thread block walks
// key blocks (items); its producer warp copies K_n and V_n of item t into
// stage t % kStages. Per item the consumers (a warpgroup per 64 features)
// replace K_n by φ(K_n) in the input dtype, kLanesPerRow threads a row, rows
// past the sequence zero (the copy engine zero-fills them, but φ(0) is not 0);
// then each warpgroup issues its 64 features of h_n = φ(K_n)ᵀ V_n (A read
// M-major, B N-major: both tiles have keys along K), sums z_n's two halves
// of keys from φ while the product runs, hands the stage back, and writes h_n
// through a shared tile in 16-byte units; the projecting kernel first turns
// its rows of h_n into h_n Wᵀ by one more product with W (copied once into
// shared memory, which leaves room for two stages). Built for sm_90a only.
#include "cuda/key_states_wgmma.h"

#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/feature_tiles.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_set_states.h"
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

struct NoTile {};

template <typename Element, int kHeadDim, int kBlockK, int kStages, bool kProject>
struct KeyStateShared {
  using KeyTile = SwizzledTile<Element, kBlockK, kHeadDim>;
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;
  KeyTile k[kStages];  // K_n as copied, then φ(K_n) in place
  KeyTile v[kStages];
  StateTile h;                    // h_n (or h_n Wᵀ) rounded, on its way out
  std::conditional_t<kProject, StateTile, NoTile> w;  // W (out, in), when projecting
  KeyTilePipeline<kStages> pipe;  // K and V of a stage complete its "keys" barrier
  SharedBarrier w_full;
  float z_half[2][kHeadDim];      // z_n over each half of the block's keys
};

// kProject: the kernel writes h_n Wᵀ (h_n rounded to the input dtype first), for the
// sparse forward's linear epilogue, which then needs no projection of its own.
template <typename Element, int kHeadDim, int kBlockK, bool kProject>
struct WgmmaKeyStates {
  static constexpr int kDim = kHeadDim, kRows = kBlockK;
  static constexpr int kConsumers = kHeadDim / kWarpgroupRows;  // a warpgroup per 64 features of h_n
  static constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
  static constexpr int kThreads = kConsumerThreads + kWarpSize;  // the producer warp last
  static constexpr int kStages =
      sizeof(KeyStateShared<Element, kHeadDim, kBlockK, 3, kProject>) + kSwizzleAtomBytes <= kHopperSharedPerBlock
          ? 3
          : 2;
  using Shared = KeyStateShared<Element, kHeadDim, kBlockK, kStages, kProject>;
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
  // φ of a row by kLanesPerRow neighbouring threads, 8 units (64 features) each.
  static constexpr int kUnitsPerThread = 8;
  static constexpr int kLanesPerRow = kHeadDim / 8 / kUnitsPerThread;
  static constexpr int kRowsPerPass = kConsumerThreads / kLanesPerRow;
  static_assert(kConsumerThreads == 2 * kHeadDim, "z_n: two threads per feature, a half of the keys each");
  static_assert(kRows % (kWarpSize / kLanesPerRow) == 0 && kRows <= kRowsPerPass && kDim == kHeadDim,
                "one pass of whole warps covers the block's rows");
};

struct KeyValueMaps {
  RowTileMap k, v;  // boxes of block_k rows
  RowTileMap w;     // one box, when projecting
};

template <typename Element>
struct KeyStateArgs {
  FeatureMap feature_map;
  float* z;          // (kv pairs * Nk, F)
  Element* block_h;  // (kv pairs, pair_tiles, F, D)
  int64_t pair_tiles;  // ≥ Nk
  Element* phi_k;    // (kv pairs, Lk, F), or null
};

// φ of the rows of `keys` in place (zero from row `rows` on), and into
// phi_rows (the block's first row of φ(K), or null) for the rows before it.
template <typename Config, typename Tile, typename Element>
__device__ __forceinline__ void phi_in_place(Tile& keys, int rows, FeatureMap feature_map, Element* phi_rows,
                                             int thread) {
  using Row = FeatureTileRow<Config::kLanesPerRow, Config::kUnitsPerThread>;
  const int first_unit = Row::first_unit(thread);
  for (int row = thread / Config::kLanesPerRow; row < Config::kRows; row += Config::kRowsPerPass) {
    float x[Row::kValues];
    Row::load(keys, row, first_unit, x);
    Row::apply(feature_map, x);
    const bool live = row < rows;
    Row::store(keys, row, first_unit, x, live);
    if (phi_rows && live) {
#pragma unroll
      for (int u = 0; u < Config::kUnitsPerThread; ++u)
        *reinterpret_cast<uint4*>(phi_rows + int64_t(row) * Config::kDim + (first_unit + u) * 8) =
            Row::template packed_unit<Element>(x, u, true);
    }
  }
}

template <typename Element, int kHeadDim, int kBlockK, bool kProject>
__global__ void __launch_bounds__(WgmmaKeyStates<Element, kHeadDim, kBlockK, kProject>::kThreads,
                                  WgmmaKeyStates<Element, kHeadDim, kBlockK, kProject>::kBlocksPerSm)
    key_block_states_wgmma_kernel(const __grid_constant__ KeyValueMaps maps, Geometry g, KeyStateArgs<Element> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaKeyStates<Element, kHeadDim, kBlockK, kProject>;
  using Shared = typename Config::Shared;
  using KeyTile = typename Shared::KeyTile;
  using StateTile = typename Shared::StateTile;
  constexpr int kTiles = kHeadDim / 8;  // accumulator tiles of a row of h_n
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  if (threadIdx.x == 0) {
    s.w_full.init(1);
    s.pipe.init(Config::kConsumerThreads);
  }
  __syncthreads();
  const int64_t items = g.kv_pairs() * g.k_blocks;

  if (threadIdx.x >= Config::kConsumerThreads) {  // the producer warp: its first lane copies
    if (threadIdx.x != Config::kConsumerThreads) return;
    if constexpr (kProject) {
      s.w_full.arrive_expect_bytes(sizeof(StateTile));
      load_row_tile(s.w, maps.w, 0, 0, 0, s.w_full);
    }
    produce_one_stage_items(s.pipe, items, 2 * sizeof(KeyTile), [&](int64_t item, int stage, SharedBarrier& full) {
      const KeyItem at = KeyItem::of(item, g);
      load_row_tile(s.k[stage], maps.k, at.n * kBlockK, at.kv, at.b, full);
      load_row_tile(s.v[stage], maps.v, at.n * kBlockK, at.kv, at.b, full);
    });
    return;
  }

  const int thread = threadIdx.x;
  const int warpgroup = thread / kWarpgroupThreads;
  // The thread's first row of the warpgroup's 64 features (its second is 8 below), as in the accumulators.
  const int tile_row = warpgroup * kWarpgroupRows + thread % kWarpgroupThreads / kWarpSize * kRowsPerWarp +
                       thread % kWarpSize / 4;
  int32_t t = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++t) {
    const int64_t pair = item / g.k_blocks, first = item % g.k_blocks * kBlockK;
    const int rows = static_cast<int>(min(int64_t(kBlockK), g.k_len - first));
    KeyTile& keys = s.k[t % Config::kStages];
    const KeyTile& values = s.v[t % Config::kStages];
    s.pipe.wait_keys(t);
    phi_in_place<Config>(keys, rows, a.feature_map, a.phi_k ? a.phi_k + (pair * g.k_len + first) * kHeadDim : nullptr,
                         thread);
    fence_shared_for_async_proxy();
    named_barrier_sync(1, Config::kConsumerThreads);

    float h[kTiles][4] = {};
    wgmma_fence();
    issue_columns_times(h, keys, warpgroup, values);
    wgmma_commit();
    {  // z_n: thread (half, f) sums feature f over half of the keys, in order
      const int f = thread % kHeadDim, half = thread / kHeadDim;
      float sum = 0.0f;
      for (int i = half * (kBlockK / 2); i < (half + 1) * (kBlockK / 2); ++i) sum += to_float(keys.unit(i, f / 8)[f % 8]);
      s.z_half[half][f] = sum;
    }
    wgmma_wait<0>();
    fence_accumulators(h);
    s.pipe.release_keys(t);
    if constexpr (kProject) {  // h_n Wᵀ, h_n rounded as the A fragments, into h's accumulators
      uint32_t rounded[kTiles / 2][4];
      accumulators_to_fragments<Element, kHeadDim>(h, rounded);
      s.w_full.wait(0);
      wgmma_fence();
      issue_projection(h, rounded, s.w);
      wgmma_wait<0>();
      fence_accumulators(h);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int j = 0; j < kTiles; ++j) s.h.accumulator_pair(tile_row + 8 * r, j) = pack2<Element>(h[j][2 * r], h[j][2 * r + 1]);
    named_barrier_sync(1, Config::kConsumerThreads);
    constexpr int kUnitsPerRow = kHeadDim / 8;
    const int64_t tile = item / g.k_blocks * a.pair_tiles + item % g.k_blocks;
    Element* block_h = a.block_h + tile * kHeadDim * kHeadDim;  // dense (F, D): unit u at 8u
    for (int u = thread; u < StateTile::kUnits; u += Config::kConsumerThreads)
      *reinterpret_cast<uint4*>(block_h + 8 * u) =
          *reinterpret_cast<const uint4*>(s.h.unit(u / kUnitsPerRow, u % kUnitsPerRow));
    if (thread < kHeadDim) a.z[item * kHeadDim + thread] = s.z_half[0][thread] + s.z_half[1][thread];
  }
#endif
}

// The kernel for one instantiation: its shape, availability and launch.
template <typename Element, int D, int BK, bool kProject>
const char* launch_key_states(const Geometry& g, const TensorView& k, const TensorView& v, const void* weight,
                              const KeyStateArgs<Element>& args, cudaStream_t stream) {
  using Config = WgmmaKeyStates<Element, D, BK, kProject>;
  const auto kernel = key_block_states_wgmma_kernel<Element, D, BK, kProject>;
  static const bool available = loaded_for_hopper(kernel);
  if (const char* refusal = hopper_kernel_refusal(available, Config::kSharedBytes)) return refusal;
  KeyValueMaps maps{};
  if (!make_row_tile_map(k, BK, &maps.k) || !make_row_tile_map(v, BK, &maps.v))
    return "k's or v's rows do not suit the tile copy engine";
  if (kProject) maps.w = state_tiles_map(weight, k.dtype, 1, D);
  const int64_t items = g.kv_pairs() * g.k_blocks;
  const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
  launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, args);
  SLATTN_LAUNCH_CHECK("key_block_states_wgmma_kernel");
  return nullptr;
}

}  // namespace

const char* key_block_states_wgmma(const Geometry& g, const TensorView& k, const TensorView& v, FeatureMap feature_map,
                                   const KeyStates& states, void* low_states, void* phi_k, cudaStream_t stream,
                                   const void* weight) {
  SLATTN_CHECK(g.features == g.dim, "key_block_states_wgmma: fixed feature maps only");
  SLATTN_CHECK(weight == nullptr || g.block_k == g.dim, "key_block_states_wgmma: W only where block_k = D");
  const char* refusal = nullptr;
  dispatch_sparse_kernel(k.dtype, g, [&](auto tag, auto head_dim, auto, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BK = decltype(block_k)::value;
    const KeyStateArgs<Element> args{feature_map, states.z, static_cast<Element*>(low_states), key_blocks_padded(g),
                                     static_cast<Element*>(phi_k)};
    if constexpr (BK == D) {
      if (weight) {
        refusal = launch_key_states<Element, D, BK, true>(g, k, v, weight, args, stream);
        return;
      }
    }
    refusal = launch_key_states<Element, D, BK, false>(g, k, v, nullptr, args, stream);
  });
  if (refusal != nullptr) return refusal;
  column_sums(states.z, g.kv_pairs(), g.k_blocks, g.features, states.total_z, stream);
  return nullptr;
}

}  // namespace slattn::cuda
