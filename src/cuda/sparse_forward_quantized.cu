// Forward of the low-bit sparse branch on Hopper (sm_90a), over the operands
// of quantize_operands.cu, on the design of sparse_forward_wgmma.cu: a
// persistent thread block per SM walks query blocks; a producer warp copies
// the INT8 Q tile, INT8 K and e4m3 Vᵀ tiles (ByteTile: rows of 64 or 128
// bytes, swizzled over their width) with the tile copy engine, each key
// tile's INT8 step announced with it; one consumer warpgroup per 64 query
// rows, S of tile t in flight with P V of tile t - 1. Per tile:
//   S = Q Kᵀ in int32 (INT8 tensor cores), exact; logits = S · q step · k step;
//   the online softmax of the bf16 kernel with P and its row sums 448 times
//   larger (the row sums from P unrounded);
//   448 P to e4m3 in registers, O_tile = P V on FP8 tensor cores into fresh
//   accumulators (their internal sums are narrower than fp32), O += O_tile in fp32.
// The epilogue divides by the row sums, which cancels the 448, and applies V's
// channel scales; Os leaves through the copy engine (forward_output_copies.cuh).
// On an H100 at the Wan2.1-1.3B shape (128-blocks) the
// previous design (three 64-row thread blocks per SM, cp.async) took 711 us,
// this one 597 us (docs/performance.md).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/forward_output_copies.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/sparse_mainloops.h"
#include "cuda/sparse_quantized.h"
#include "cuda/tensor_map.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // used by the sm_90a kernel body only
// P in [0, 1] is stored as e4m3(448 P), 448 the largest e4m3 value: exp2 offset log2(448).
constexpr float kLog2E4m3Max = 8.807354922057604f;

// x as fp32 for |x| < 2^22 (an INT8 dot product of up to 128 terms is below
// 127² · 128 < 2^21): the bits of 1.5 · 2^23 + x, less 1.5 · 2^23. Two
// full-rate operations instead of a conversion at a quarter of their rate.
__device__ __forceinline__ float small_int_to_float(int32_t x) {
  constexpr int32_t kMagicBits = 0x4B400000;  // 1.5 · 2^23 as fp32
  constexpr float kMagic = 12582912.0f;
  return __int_as_float(x + kMagicBits) - kMagic;
}
#endif

// The shape of the kernel: warpgroups, stages, shared memory. The key tiles
// are half the bytes of the 16-bit kernel's, so there are more stages.
template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
struct QuantizedForward {
  static constexpr int kConsumers = kBlockQ / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  static constexpr int kStages = 3;
  using QTile = ByteTile<kBlockQ, kHeadDim>;
  using KeyTile = ByteTile<kKeyTile, kHeadDim>;
  using ValueTile = ByteTile<kHeadDim, kKeyTile>;  // Vᵀ: a row per channel, K-major for the FP8 product
  using OutTile = SwizzledTile<Element, kBlockQ, kHeadDim>;
  struct Shared {
    QTile q;
    KeyTile k[kStages];
    ValueTile v[kStages];
    OutTile out;               // Os of the block, normalised, for the copy engine to store
    float tile_step[kStages];  // the INT8 step of each stage's key block, announced with its K
    KeyTilePipeline<kStages> pipe;
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;  // aligned to the swizzle atom at run time
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
__global__ void __launch_bounds__(QuantizedForward<Element, kHeadDim, kBlockQ, kKeyTile>::kThreads,
                                  QuantizedForward<Element, kHeadDim, kBlockQ, kKeyTile>::kBlocksPerSm)
    sparse_forward_quantized_kernel(const __grid_constant__ QkvTileMaps maps, const __grid_constant__ RowTileMap os_map,
                                    bool store_by_copies, Geometry g, RoutingPlanView plan,
                                    SparseForwardArgs a, QuantizedOperands ops) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(127 * 127 * kHeadDim < (1 << 22), "S must stay within small_int_to_float's range");
  using Config = QuantizedForward<Element, kHeadDim, kBlockQ, kKeyTile>;
  using Shared = typename Config::Shared;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  if (threadIdx.x == 0) s.pipe.init(Config::kConsumers * kWarpgroupThreads);
  __syncthreads();
  auto kv_pair_of = [&](const QueryItem& at) { return at.b * g.kv_heads + at.h / g.group(); };
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x >= kWarpSize) return;
    produce_items(
        s.pipe, g, plan,
        [&](const QueryItem& at, SharedBarrier& full) {
          full.arrive_expect_bytes(sizeof(s.q));
          tma_load(s.q.data, maps.q.map, maps.q.at(0, at.m * kBlockQ, at.b * g.heads + at.h, 0), full);
        },
        [&](const QueryItem& at, int32_t n) { return ops.k_steps[kv_pair_of(at) * g.k_blocks + n]; },
        [&](int stage, const QueryItem& at, int32_t n, float step, SharedBarrier& full) {
          s.tile_step[stage] = step;
          full.arrive_expect_bytes(sizeof(s.k[stage]));
          tma_load(s.k[stage].data, maps.k.map, maps.k.at(0, n * g.block_k, kv_pair_of(at), 0), full);
        },
        [&](int stage, const QueryItem& at, int32_t n, SharedBarrier& full) {
          full.arrive_expect_bytes(sizeof(s.v[stage]));
          tma_load(s.v[stage].data, maps.v.map, maps.v.at(static_cast<int32_t>(n * g.block_k), 0, kv_pair_of(at), 0),
                   full);
        });
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  int32_t exact[kKeyTile / 8][4];
  float score[kKeyTile / 8][4], tile_out[kHeadDim / 8][4];
  uint32_t p[kKeyTile / 32][4];  // P of the previous tile, whose P V is issued with the next S = Q Kᵀ
  float correction[2];
  // S = Q Kᵀ of tile t (INT8, exact), issued.
  auto issue_scores = [&](int32_t t) {
    s.pipe.wait_keys(t);
    uint64_t q_desc = k_major_descriptor(s.q), k_desc = k_major_descriptor(s.k[s.pipe.stage(t)]);
    opaque(q_desc);
#pragma unroll
    for (int step = 0; step < kHeadDim / 32; ++step)  // 32 head dims a step
      wgmma_ss_s8<kKeyTile>(exact, q_desc + byte_tile_offset<kHeadDim>(warpgroup_row0, step),
                            k_desc + byte_tile_offset<kHeadDim>(0, step), step > 0);
    wgmma_commit();
  };
  // Once tile t's scores are complete: its logits' scale and start, the stage handed back, the online softmax.
  auto softmax_of = [&](int32_t t, float q_scale_log2, float (&row_max)[2], float (&row_sum)[2]) {
    fence_accumulators(exact);
    const int stage = s.pipe.stage(t);
    const float scale_log2 = q_scale_log2 * s.tile_step[stage];
    const int64_t first = s.pipe.tile_first[stage];
    s.pipe.release_keys(t);
#pragma unroll
    for (int j = 0; j < kKeyTile / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) score[j][e] = small_int_to_float(exact[j][e]);
    softmax_scores<KeyMask::partial_tiles>(score, row_max, row_sum, first, min(g.k_len, first + kKeyTile), scale_log2,
                                           correction, kLog2E4m3Max);
  };
  // P V of tile t into fresh accumulators (FP8 products sum in less than fp32), issued.
  auto issue_values = [&](int32_t t) {
    s.pipe.wait_values(t);
    uint64_t v_desc = k_major_descriptor(s.v[s.pipe.stage(t)]);
    opaque(v_desc);
#pragma unroll
    for (int step = 0; step < kKeyTile / 32; ++step)  // 32 keys a step
      wgmma_rs_e4m3<kHeadDim>(tile_out, p[step], v_desc + byte_tile_offset<kKeyTile>(0, step), step > 0);
    wgmma_commit();
  };
  int32_t t0 = 0;  // the ring position of this item's first tile
  int32_t use = 0;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    const int64_t q_pair = at.b * g.heads + at.h;
    const float q_scale_log2 = a.scale * kLog2e * ops.q_steps[q_pair * g.q_blocks + at.m];
    s.pipe.q_full.wait(use & 1);
    const int32_t total = s.pipe.item_tiles;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    float out[kHeadDim / 8][4] = {};
    // The overlap of the 16-bit forward: S of tile t and P V of tile t - 1 in flight together, tile t's
    // softmax while the second runs; the first tile's scores and the last tile's values on their own.
    if (total > 0) {
      wgmma_fence();
      issue_scores(t0);
      wgmma_wait<0>();
      softmax_of(t0, q_scale_log2, row_max, row_sum);
      accumulators_to_e4m3_fragments<kKeyTile>(score, p);
    }
    for (int32_t t = t0 + 1; t < t0 + total; ++t) {
      wgmma_fence();
      issue_scores(t);
      issue_values(t - 1);
      wgmma_wait<1>();
      softmax_of(t, q_scale_log2, row_max, row_sum);
      wgmma_wait<0>();
      fence_accumulators(tile_out);
      s.pipe.release_values(t - 1);
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[j][e] = (out[j][e] + tile_out[j][e]) * correction[e / 2];
      accumulators_to_e4m3_fragments<kKeyTile>(score, p);
    }
    s.pipe.q_empty.arrive();  // every product that reads Q is complete
    // V's channel scales at this thread's accumulator columns, loaded while the last tile's P V runs.
    const float* v_scales = ops.v_scales + kv_pair_of(at) * kHeadDim;
    float2 channel_scale[kHeadDim / 8];
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
      channel_scale[j] = *reinterpret_cast<const float2*>(&v_scales[accumulator_col(j, 0)]);
    if (total > 0) {
      const int32_t last = t0 + total - 1;
      wgmma_fence();
      issue_values(last);
      wgmma_wait<0>();
      fence_accumulators(tile_out);
      s.pipe.release_values(last);
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) out[j][e] += tile_out[j][e];
    }
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[j][e] *= e % 2 ? channel_scale[j].y : channel_scale[j].x;
    for (float& peak : row_max) peak -= kLog2E4m3Max;  // the LSE of P, not of 448 P
    end_forward_block<Element, kHeadDim, kBlockQ>(g, a, os_map, store_by_copies, at, consumer_thread, out, row_max,
                                                  row_sum, s.out);
    t0 += total;
  }
  drain_forward_stores(store_by_copies, consumer_thread);
#endif
}

constexpr const char* kNeedsHopper =
    "quantized=True on CUDA needs a compute capability 9.0 GPU and a build with sm_90a code (the CPU path "
    "computes it as fake quantization)";

// Calls fn(kernel, shared bytes, Config) for the kernel of g's shape.
template <typename Fn>
void with_quantized_kernel(const Geometry& g, DType dtype, Fn&& fn) {
  dispatch_sparse_kernel(dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, BK = decltype(block_k)::value;
    using Config = QuantizedForward<Element, D, BQ, BK>;
    fn(sparse_forward_quantized_kernel<Element, D, BQ, BK>, Config::kSharedBytes, Config{});
  });
}

}  // namespace

void check_quantized_support(const Geometry& g, DType dtype) {
  check_sparse_support(g);
  if (!current_device_is_hopper()) throw Unsupported(kNeedsHopper);
  with_quantized_kernel(g, dtype, [&](auto kernel, size_t shared, auto config) {
    static const bool available = loaded_for_hopper(kernel);
    if (!available) throw Unsupported(kNeedsHopper);
    SLATTN_CHECK(shared <= max_shared_per_block(), "quantized=True: the low-bit forward needs ", shared,
                 " bytes of shared memory, more than this GPU gives a thread block");
  });
}

void sparse_forward_quantized(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                              const QuantizedOperands& ops, cudaStream_t stream) {
  with_quantized_kernel(g, args.q.dtype, [&](auto kernel, size_t shared, auto config) {
    using Config = decltype(config);
    const int64_t items = g.q_blocks * g.heads * g.batch;
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    const QkvTileMaps maps{
        byte_tile_map(ops.q, g.q_pairs(), g.q_rows(), g.dim, g.block_q, static_cast<int>(g.dim)),
        byte_tile_map(ops.k, g.kv_pairs(), g.k_rows(), g.dim, g.block_k, static_cast<int>(g.dim)),
        byte_tile_map(ops.v, g.kv_pairs(), g.dim, g.k_rows(), static_cast<int>(g.dim), g.block_k)};
    RowTileMap os_map{};
    const bool store_by_copies = forward_output_map(args, &os_map);
    launch_with_shared(kernel, grid, Config::kThreads, shared, stream, maps, os_map, store_by_copies, g, plan, args,
                       ops);
  });
  SLATTN_LAUNCH_CHECK("sparse_forward_quantized_kernel");
}

}  // namespace slattn::cuda
