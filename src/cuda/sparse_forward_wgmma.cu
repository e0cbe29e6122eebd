// Forward of the sparse branch on Hopper (sm_90a), warp-specialised as in
// FlashAttention-3: a thread block owns one query block; the first thread
// of a producer warpgroup copies Q and the key tiles of the row list (whole
// key blocks) with the tile copy engine into two stages, each completing on
// an mbarrier; one consumer warpgroup per 64 query rows computes S = Q Kᵀ
// from shared memory, the online softmax, and O += P V with P in registers,
// and hands each K and V tile back on its own barrier; Os leaves through the
// copy engine (forward_output_copies.cuh). With the linear terms (kLinear)
// each query block ends with the linear branch and the projection
// (forward_linear_epilogue.cuh). Built for sm_90a only;
// other targets get an empty body that is never launched (sparse_forward
// checks the loaded binary), and layouts the copy engine cannot describe go
// to the mma.sync mainloop.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/forward_linear_epilogue.cuh"
#include "cuda/forward_output_copies.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_set_operands.h"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tensor_map.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

// The shape of the kernel: warpgroups, stages, shared memory, thread blocks per SM.
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
struct WgmmaForward {
  static constexpr int kConsumers = kBlockQ / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  static constexpr int kStages = 2;
  using QTile = SwizzledTile<Element, kBlockQ, kHeadDim>;
  using KeyTile = SwizzledTile<Element, kKeyTile, kHeadDim>;
  struct Shared {
    QTile q;
    KeyTile k[kStages];
    KeyTile v[kStages];
    QTile out;  // Os of the block, normalised, for the copy engine to store
    KeyTilePipeline<kStages> pipe;
    // With the linear terms: Z_m of the block (copied with Q), φ(q)·Z_m + ε of its rows, the projection's b.
    alignas(16) float z_m[kHeadDim];
    float den[kBlockQ];
    float bias[kHeadDim];
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;  // aligned to the swizzle atom at run time
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

// S (64 x kKeyTile) = Q Kᵀ for the warpgroup's 64 query rows from `row0` of the Q tile, 16 head dims
// a step; issued and committed, not awaited.
template <typename QTile, typename KeyTile, int kKeyTiles8>
__device__ __forceinline__ void issue_scores(float (&score)[kKeyTiles8][4], const QTile& q, const KeyTile& k,
                                             int row0) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(q.data[0])>>;
  uint64_t q_desc = k_major_descriptor(q), k_desc = k_major_descriptor(k);
  opaque(q_desc);
#pragma unroll
  for (int step = 0; step < QTile::kChunks * QTile::kChunkCols / 16; ++step)
    wgmma_ss<Element, kKeyTiles8 * 8, 0, 0>(score, q_desc + k_major_offset<QTile>(row0, step),
                                            k_desc + k_major_offset<KeyTile>(0, step), step > 0);
  wgmma_commit();
}

// O += P V, 16 keys a step, P in registers and V read N-major; issued and committed, not awaited.
template <typename KeyTile, int kDimTiles8, int kKeySteps>
__device__ __forceinline__ void issue_values(float (&out)[kDimTiles8][4], const uint32_t (&p)[kKeySteps][4],
                                             const KeyTile& v) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(v.data[0])>>;
  uint64_t v_desc = mn_major_descriptor(v);
  opaque(v_desc);
#pragma unroll
  for (int step = 0; step < kKeySteps; ++step)
    wgmma_rs<Element, kDimTiles8 * 8, 1>(out, p[step], v_desc + mn_major_offset(step), true);
  wgmma_commit();
}

// kLinear: the kernel adds the linear terms in its epilogue (forward_linear_epilogue.cuh).
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile, bool kLinear>
__global__ void __launch_bounds__(WgmmaForward<Element, kHeadDim, kBlockQ, kKeyTile>::kThreads,
                                  WgmmaForward<Element, kHeadDim, kBlockQ, kKeyTile>::kBlocksPerSm)
    sparse_forward_wgmma_kernel(const __grid_constant__ QkvTileMaps maps, const __grid_constant__ RowTileMap os_map,
                                bool store_by_copies, Geometry g, RoutingPlanView plan, SparseForwardArgs a,
                                const __grid_constant__ ForwardLinearKernelArgs linear) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaForward<Element, kHeadDim, kBlockQ, kKeyTile>;
  using Shared = typename Config::Shared;
  using QTile = typename Config::QTile;
  using KeyTile = typename Config::KeyTile;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  if (threadIdx.x == 0) s.pipe.init(Config::kConsumers * kWarpgroupThreads);
  if (kLinear && threadIdx.x < kHeadDim) s.bias[threadIdx.x] = linear.bias ? linear.bias[threadIdx.x] : 0.0f;
  __syncthreads();
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x >= kWarpSize) return;
    const auto load_query = [&](const QueryItem& at, SharedBarrier& full) {
      constexpr uint32_t kZBytes = kLinear ? sizeof(s.z_m) : 0;
      full.arrive_expect_bytes(sizeof(QTile) + kZBytes);
      load_row_tile(s.q, maps.q, at.m * kBlockQ, at.h, at.b, full);
      if constexpr (kLinear)
        bulk_load(s.z_m, linear.set_z + ((at.b * g.heads + at.h) * g.q_blocks + at.m) * kHeadDim, kZBytes, full);
    };
    const auto lane_value = [](const QueryItem&, int32_t) { return 0; };
    const auto load_keys = [&](int stage, const QueryItem& at, int32_t n, int, SharedBarrier& full) {
      full.arrive_expect_bytes(sizeof(KeyTile));
      load_row_tile(s.k[stage], maps.k, n * g.block_k, at.h / g.group(), at.b, full);
    };
    const auto load_values = [&](int stage, const QueryItem& at, int32_t n, SharedBarrier& full) {
      full.arrive_expect_bytes(sizeof(KeyTile));
      load_row_tile(s.v[stage], maps.v, n * g.block_k, at.h / g.group(), at.b, full);
    };
    if constexpr (kLinear) {  // H_m Wᵀ into the tail stage's K tile; its V tile holds nothing
      static_assert(kKeyTile == kHeadDim, "a key tile holds a D x D state");
      produce_items(s.pipe, g, plan, load_query, lane_value, load_keys, load_values,
                    [&](int stage, const QueryItem& at, SharedBarrier& keys, SharedBarrier& values) {
                      keys.arrive_expect_bytes(sizeof(KeyTile));
                      load_row_tile(s.k[stage], linear.set_h, 0, (at.b * g.heads + at.h) * g.q_blocks + at.m, 0, keys);
                      values.arrive();
                    });
    } else {
      produce_items(s.pipe, g, plan, load_query, lane_value, load_keys, load_values);
    }
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const float scale_log2 = a.scale * kLog2e;
  float score[kKeyTile / 8][4];
  uint32_t p[kKeyTile / 16][4];  // P of the previous tile, whose O += P V is issued with the next S = Q Kᵀ
  float correction[2];
  // The softmax of tile t once its scores are complete (the stage's K handed back first).
  auto softmax_of = [&](int32_t t, float (&row_max)[2], float (&row_sum)[2]) {
    fence_accumulators(score);
    const int64_t first = s.pipe.tile_first[s.pipe.stage(t)];
    s.pipe.release_keys(t);
    softmax_scores<KeyMask::partial_tiles>(score, row_max, row_sum, first, min(g.k_len, first + kKeyTile), scale_log2,
                                           correction);
  };
  int32_t t0 = 0;  // the ring position of this item's first tile
  int32_t use = 0;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    s.pipe.q_full.wait(use & 1);
    const int32_t total = s.pipe.item_tiles;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    float out[kHeadDim / 8][4] = {};
    // FlashAttention-3's overlap within a warpgroup: S of tile t and O += P V of tile t - 1 are issued
    // together, and tile t's softmax runs while the second product is in flight. The first tile's
    // scores and the last tile's values are issued on their own, so that the loop body has one shape.
    if (total > 0) {
      s.pipe.wait_keys(t0);
      wgmma_fence();
      issue_scores(score, s.q, s.k[s.pipe.stage(t0)], warpgroup_row0);
      wgmma_wait<0>();
      softmax_of(t0, row_max, row_sum);
      accumulators_to_fragments<Element, kKeyTile>(score, p);
    }
    for (int32_t t = t0 + 1; t < t0 + total; ++t) {
      s.pipe.wait_keys(t);
      wgmma_fence();
      issue_scores(score, s.q, s.k[s.pipe.stage(t)], warpgroup_row0);
      s.pipe.wait_values(t - 1);
      issue_values(out, p, s.v[s.pipe.stage(t - 1)]);
      wgmma_wait<1>();
      softmax_of(t, row_max, row_sum);
      wgmma_wait<0>();
      fence_accumulators(out);
      s.pipe.release_values(t - 1);
      rescale_rows(out, correction);
      accumulators_to_fragments<Element, kKeyTile>(score, p);
    }
    if constexpr (kLinear) {
      const int32_t last = t0 + total - 1;
      end_block_with_linear_terms<Element, kHeadDim, kBlockQ>(
          s, g, a, linear, at, t0, total, consumer_thread, out, row_max, row_sum, [&] {
            s.pipe.wait_values(last);
            wgmma_fence();
            issue_values(out, p, s.v[s.pipe.stage(last)]);
          });
      t0 += total + 1;
    } else {
      s.pipe.q_empty.arrive();  // every product that reads Q is complete
      if (total > 0) {
        const int32_t last = t0 + total - 1;
        s.pipe.wait_values(last);
        wgmma_fence();
        issue_values(out, p, s.v[s.pipe.stage(last)]);
        wgmma_wait<0>();
        fence_accumulators(out);
        s.pipe.release_values(last);
      }
      end_forward_block<Element, kHeadDim, kBlockQ>(g, a, os_map, store_by_copies, at, consumer_thread, out, row_max,
                                                    row_sum, s.out);
      t0 += total;
    }
  }
  drain_forward_stores(store_by_copies || kLinear, consumer_thread);
#endif
}

// The kernel's view of the terms `before` prepares (for an instantiation whose key tiles hold a D x D
// state), or false (`before` not called when the copy engine cannot write out or out_sparse).
template <int kHeadDim>
bool prepare_linear_terms(const Geometry& g, const SparseForwardArgs& args, const ForwardLinearStep& before,
                          ForwardLinearKernelArgs* linear) {
  if (!before || args.os_rows != nullptr) return false;
  linear->store_sparse = args.out_sparse.defined();
  if (!make_row_tile_map(before.out, kWarpgroupRows, &linear->out) ||
      (linear->store_sparse && !make_row_tile_map(args.out_sparse, kWarpgroupRows, &linear->out_sparse)))
    return false;
  const ForwardLinearTerms* terms = before.prepare();
  if (terms == nullptr) return false;
  linear->set_h = state_tiles_map(terms->set_h, args.q.dtype, g.q_pairs() * g.q_blocks, kHeadDim);
  linear->feature_map = terms->feature_map;
  linear->set_z = terms->set_z;
  linear->bias = terms->bias;
  return true;
}

}  // namespace

const char* sparse_forward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                                 const ForwardLinearStep& before, bool* terms_added, cudaStream_t stream) {
  const char* refusal = nullptr;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  *terms_added = false;
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, KT = decltype(block_k)::value;
    using Config = WgmmaForward<Element, D, BQ, KT>;
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    const auto kernel = sparse_forward_wgmma_kernel<Element, D, BQ, KT, false>;
    static const bool available = loaded_for_hopper(kernel);
    const size_t shared = Config::kSharedBytes;
    QkvTileMaps maps;
    RowTileMap os_map{};
    refusal = hopper_kernel_refusal(available, shared);
    if (refusal != nullptr) return;
    if (!make_row_tile_map(args.q, BQ, &maps.q) || !make_row_tile_map(args.k, KT, &maps.k) ||
        !make_row_tile_map(args.v, KT, &maps.v)) {
      refusal = "the Hopper forward copies q, k and v with the tile copy engine, which needs each to have a "
                "contiguous head dim, a 16-byte-aligned start and strides that are multiples of 16 bytes";
      return;
    }
    ForwardLinearKernelArgs linear{};
    if constexpr (KT == D) {
      if (prepare_linear_terms<D>(g, args, before, &linear)) {
        launch_with_shared(sparse_forward_wgmma_kernel<Element, D, BQ, KT, true>, grid, Config::kThreads, shared,
                           stream, maps, os_map, false, g, plan, args, linear);
        *terms_added = true;
        return;
      }
    }
    const bool store_by_copies = forward_output_map(args, &os_map);
    launch_with_shared(kernel, grid, Config::kThreads, shared, stream, maps, os_map, store_by_copies, g, plan, args,
                       linear);
  });
  if (refusal == nullptr) SLATTN_LAUNCH_CHECK("sparse_forward_wgmma_kernel");
  return refusal;
}

}  // namespace slattn::cuda
