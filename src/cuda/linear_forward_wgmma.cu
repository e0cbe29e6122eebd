// The linear branch's forward on Hopper (linear_forward_wgmma.h): Z_m per
// query block, φ(Q) rows and their denominators φ(q)·Z_m + ε, every query
// block's H_m (one product of the linear set's indicator with the key-block
// states, linear_set_states.h) and W in the input dtype
// (linear_set_operands.h), then one warp-specialised, persistent kernel. Its
// producer thread copies per query block φ(Q_m) and H_m with the tile copy
// engine (one stage: a second measured no faster, the block's Os being read
// before the wait for its tiles already); each consumer warpgroup (64 query
// rows) issues O = φ(Q) H_m. The epilogue writes Ol = O / den and adds
// Ol Wᵀ + b (a register-A product with W) to the output: Os, read in 16-byte units before the wait for the
// block's tiles, gets it in shared memory and goes back in 16-byte units.
// Built for sm_90a only; other targets get an empty body that is never
// launched.
#include "cuda/linear_forward_wgmma.h"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_set_products.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

// The shape of the kernel: warpgroups, stages, shared memory, thread blocks per SM.
template <typename Element, int kHeadDim, int kBlockQ>
struct WgmmaLinear {
  static constexpr int kConsumers = kBlockQ / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  using QTile = SwizzledTile<Element, kBlockQ, kHeadDim>;       // φ(Q_m), or the block's output rows
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;  // H_m (F x D), or W as (out, in)
  struct Shared {
    QTile q;
    QTile staged;  // the block's Os rows, then Os + Ol Wᵀ + b: the output read and written in 16-byte units
    StateTile h;
    StateTile w;
    ItemStages<1> item;
    SharedBarrier w_full;
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

// What the kernel reads besides its tiles, and where it writes.
template <typename Element>
struct LinearOutputArgs {
  const float* denominator;  // φ(q)·Z_m + ε per query row
  bool project;              // out = Os + Ol Wᵀ + b
  const float* bias;         // or null
  DeviceView<const Element> os;  // read with a projection; may be out itself
  DeviceView<Element> out, out_linear;
};

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(WgmmaLinear<Element, kHeadDim, kBlockQ>::kThreads,
                                  WgmmaLinear<Element, kHeadDim, kBlockQ>::kBlocksPerSm)
    linear_output_wgmma_kernel(const __grid_constant__ LinearSetMaps maps, Geometry g, LinearOutputArgs<Element> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaLinear<Element, kHeadDim, kBlockQ>;
  using Shared = typename Config::Shared;
  using QTile = typename Config::QTile;
  using StateTile = typename Config::StateTile;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  const int64_t items = g.q_blocks * g.heads * g.batch;

  if (threadIdx.x == 0) {
    s.w_full.init(1);
    s.item.init(Config::kConsumers * kWarpgroupThreads);
  }
  __syncthreads();
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x != 0) return;
    if (a.project) {
      s.w_full.arrive_expect_bytes(sizeof(StateTile));
      load_row_tile(s.w, maps.w, 0, 0, 0, s.w_full);
    }
    produce_whole_items(s.item, items, [&](int64_t item, int, SharedBarrier& full) {
      const QueryItem at = QueryItem::of(item, g);
      full.arrive_expect_bytes(sizeof(QTile) + sizeof(StateTile));
      load_row_tile(s.q, maps.phi_q, at.m * kBlockQ, at.h, at.b, full);
      load_row_tile(s.h, maps.set_h, 0, (at.b * g.heads + at.h) * g.q_blocks + at.m, 0, full);
    });
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup_row0 = consumer_thread / kWarpgroupThreads * kWarpgroupRows;
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, quad = lane % 4;
  const int warpgroup = consumer_thread / kWarpgroupThreads, warpgroup_thread = consumer_thread % kWarpgroupThreads;
  const int tile_row = consumer_thread / kWarpSize * kRowsPerWarp + group;  // the thread's first row of the tiles
  constexpr int kUnitsPerRow = kHeadDim / 8;
  constexpr int kUnitsPerThread = kWarpgroupRows * kUnitsPerRow / kWarpgroupThreads;
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    const int64_t pair = at.b * g.heads + at.h;
    const int64_t warp_row0 = at.m * kBlockQ + consumer_thread / kWarpSize * kRowsPerWarp;
    float inverse[2];  // 1 / den of the thread's rows, read before the walk; 0 past the sequence
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = warp_row0 + group + 8 * r;
      inverse[r] = row < g.q_len ? 1.0f / a.denominator[pair * g.q_len + row] : 0.0f;
    }
    // Os of the warpgroup's rows in 16-byte units (a thread's units: every 128th), read before the
    // walk; the epilogue adds Ol Wᵀ + b to them in shared memory.
    uint4 os_units[kUnitsPerThread];
#pragma unroll
    for (int i = 0; i < kUnitsPerThread; ++i) {
      const int unit = warpgroup_thread + i * kWarpgroupThreads;
      const int64_t row = at.m * kBlockQ + warpgroup_row0 + unit / kUnitsPerRow;
      os_units[i] = a.project && row < g.q_len
                        ? *reinterpret_cast<const uint4*>(&a.os.at(at.b, at.h, row, unit % kUnitsPerRow * 8))
                        : make_uint4(0, 0, 0, 0);
    }
    // The loads above are issued before the wait for the item's tiles: their latency overlaps it.
    s.item.wait_full(use);
    float out[kHeadDim / 8][4] = {};
    wgmma_fence();
    issue_rows_times<1, StateRead::as_stored>(out, s.q, s.h, warpgroup_row0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(out);
    s.item.release(use);  // every read of φ(Q) and H_m is complete

    // Ol = O / den on the rows of the sequence (0 elsewhere); an empty U_m has H_m = 0, so O = 0.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = warp_row0 + group + 8 * r;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        out[j][2 * r] *= inverse[r];
        out[j][2 * r + 1] *= inverse[r];
        if (a.out_linear.defined() && row < g.q_len)
          store_pair(a.out_linear, at.b, at.h, row, j * 8 + 2 * quad, out[j][2 * r], out[j][2 * r + 1]);
      }
    }
    if (!a.project) continue;

    // out = Os + Ol Wᵀ + b, Ol rounded to the input dtype for the product (SPEC section 4).
    uint32_t ol[kHeadDim / 16][4];
    accumulators_to_fragments<Element, kHeadDim>(out, ol);
    float projected[kHeadDim / 8][4];
    s.w_full.wait(0);
    wgmma_fence();
    issue_projection(projected, ol, s.w);
    wgmma_wait<0>();
    fence_accumulators(projected);
#pragma unroll
    for (int i = 0; i < kUnitsPerThread; ++i) {
      const int unit = warpgroup_thread + i * kWarpgroupThreads;
      *reinterpret_cast<uint4*>(s.staged.unit(warpgroup_row0 + unit / kUnitsPerRow, unit % kUnitsPerRow)) = os_units[i];
    }
    named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        const int d = j * 8 + 2 * quad;
        const float2 os = unpack2<Element>(s.staged.accumulator_pair(tile_row + 8 * r, j));
        const float2 b = a.bias ? make_float2(a.bias[d], a.bias[d + 1]) : make_float2(0.0f, 0.0f);
        s.staged.accumulator_pair(tile_row + 8 * r, j) =
            pack2<Element>(os.x + projected[j][2 * r] + b.x, os.y + projected[j][2 * r + 1] + b.y);
      }
    }
    named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
#pragma unroll
    for (int i = 0; i < kUnitsPerThread; ++i) {  // each thread writes the units it read: no hazard with the next block
      const int unit = warpgroup_thread + i * kWarpgroupThreads;
      const int64_t row = at.m * kBlockQ + warpgroup_row0 + unit / kUnitsPerRow;
      if (row < g.q_len)
        *reinterpret_cast<uint4*>(&a.out.at(at.b, at.h, row, unit % kUnitsPerRow * 8)) =
            *reinterpret_cast<const uint4*>(s.staged.unit(warpgroup_row0 + unit / kUnitsPerRow, unit % kUnitsPerRow));
    }
  }
#endif
}

}  // namespace

const char* linear_output_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                const LinearSetOperands& operands, const float* weight, const float* bias,
                                const TensorView& os, const TensorView& out, const TensorView& out_linear,
                                cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "linear_output_wgmma: fixed feature maps only");
  const char* refusal = nullptr;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    using Config = WgmmaLinear<Element, D, BQ>;
    const auto kernel = linear_output_wgmma_kernel<Element, D, BQ>;
    static const bool available = loaded_for_hopper(kernel);
    refusal = hopper_kernel_refusal(available, Config::kSharedBytes);
    if (refusal != nullptr) return;
    if (operands.phi_q == nullptr) {
      refusal = "the workspace was carved for the sparse forward's linear epilogue (no φ(Q) rows)";
      return;
    }
    if (weight && !(rows_are_16_byte_aligned(DeviceView<Element>::of(out)) &&
                    rows_are_16_byte_aligned(DeviceView<const Element>::of(os)))) {
      refusal = "the Hopper linear forward reads Os's rows and writes out's in 16-byte vectors";
      return;
    }
    const LinearSetMaps maps = linear_set_maps(g, q.dtype, operands);
    prepare_linear_set_operands(g, plan, q, feature_map, scope, states, weight, operands, stream);

    const LinearOutputArgs<Element> args{operands.denominator, weight != nullptr, bias,
                                         DeviceView<const Element>::of(os), DeviceView<Element>::of(out),
                                         DeviceView<Element>::of(out_linear)};
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, args);
    SLATTN_LAUNCH_CHECK("linear_output_wgmma_kernel");
  });
  return refusal;
}

}  // namespace slattn::cuda
