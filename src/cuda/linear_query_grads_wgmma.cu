// The query side of the linear backward on Hopper (linear_backward_wgmma.h):
// one warp-specialised, persistent kernel over the query blocks. Its producer
// thread copies per query block φ(Q_m), dO_m (with a projection) and H_m (the
// linear set's product, linear_set_states.h), into two stages with two
// consumer warpgroups (the next block's copies overlap this one's work). One
// consumer warpgroup per 64 query rows reads its rows' den and its columns of Z_m
// (linear_set_operands.h), forms dOl = dO W (+ the returned Ol's gradient)
// and stores it over dO in the input dtype, then issues P = dOl H_mᵀ and
// (for dW) O = φ(Q) H_m. It writes Ol, forms dQφ = P / den − c Z_m through φ
// into dq, and stores φ(Q) / den over φ(Q); after a barrier of the consumers,
// dH_m (64 features per warpgroup: A = φ(Q) / den read M-major, B = dOl read
// N-major) and dZ_m (from the rows' c den, kept in shared memory). Built for
// sm_90a only.
#include "cuda/linear_backward_wgmma.h"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
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

// The shape of the kernel: warpgroups, shared memory, thread blocks per SM.
template <typename Element, int kHeadDim, int kBlockQ>
struct WgmmaQueryGrads {
  static constexpr int kConsumers = kBlockQ / kWarpgroupRows;
  static constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
  using QTile = SwizzledTile<Element, kBlockQ, kHeadDim>;
  using StateTile = SwizzledTile<Element, kHeadDim, kHeadDim>;  // H_m (F x D), or W as (out, in)
  // The next block's tiles copied during this one's work; with one consumer warpgroup two thread blocks
  // share an SM instead.
  static constexpr int kStages = kConsumers > 1 ? 2 : 1;
  struct Shared {
    QTile phi[kStages];    // φ(Q_m); after the products φ(Q_m) / den
    QTile dol[kStages];    // dO_m as copied, then dOl_m
    StateTile h[kStages];  // H_m
    StateTile w;
    ItemStages<kStages> item;
    SharedBarrier w_full;
    float row_dots[kStages][kBlockQ];  // φ(q_i)·P_i / den_i = c_i den_i, for dZ_m
  };
  static constexpr size_t kSharedBytes = sizeof(Shared) + kSwizzleAtomBytes;
  static_assert(kSharedBytes <= kHopperSharedPerBlock, "the stages fit a Hopper thread block");
  static constexpr int kBlocksPerSm = blocks_per_sm(kSharedBytes, kConsumers);
};

struct QueryGradMaps {
  LinearSetMaps set;
  RowTileMap dout;  // boxes of block_q rows
};

template <typename Element>
struct QueryGradKernelArgs {
  FeatureMap feature_map;
  const float* denominator;  // φ(q)·Z_m + ε per query row
  const float* set_z;        // Z_m per query block, (q pairs * Mq, F)
  const int32_t* set_size;   // |U_m| per query block
  bool project;              // dOl = dO W, and Ol rows for dW
  DeviceView<const Element> dout_linear;
  Element* ol_low;  // Ol rows in the input dtype, for dW
  const float* dq_rows;
  DeviceView<Element> dq;
  Element* dh_low;  // dH_m in the input dtype, (kv pairs, dh_pair_tiles, F, D)
  int64_t dh_pair_tiles;
  float* dz_query;
};

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(WgmmaQueryGrads<Element, kHeadDim, kBlockQ>::kThreads,
                                  WgmmaQueryGrads<Element, kHeadDim, kBlockQ>::kBlocksPerSm)
    linear_query_grads_wgmma_kernel(const __grid_constant__ QueryGradMaps maps, Geometry g,
                                    QueryGradKernelArgs<Element> a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Config = WgmmaQueryGrads<Element, kHeadDim, kBlockQ>;
  using Shared = typename Config::Shared;
  using QTile = typename Config::QTile;
  using StateTile = typename Config::StateTile;
  using Registers = RegisterSplit<Config::kThreads, Config::kConsumers, Config::kBlocksPerSm>;
  constexpr int kTiles = kHeadDim / 8;  // accumulator tiles of a row
  constexpr int kConsumerThreads = Config::kConsumers * kWarpgroupThreads;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));
  const int64_t items = g.q_blocks * g.heads * g.batch;

  if (threadIdx.x == 0) {
    s.w_full.init(1);
    s.item.init(kConsumerThreads);
  }
  __syncthreads();
  if (threadIdx.x < kWarpgroupThreads) {  // the producer: its first warp
    if constexpr (Registers::kHandOver) release_registers_to<Registers::kProducer>();
    if (threadIdx.x != 0) return;
    if (a.project) {
      s.w_full.arrive_expect_bytes(sizeof(StateTile));
      load_row_tile(s.w, maps.set.w, 0, 0, 0, s.w_full);
    }
    produce_whole_items(s.item, items, [&](int64_t item, int stage, SharedBarrier& full) {
      const QueryItem at = QueryItem::of(item, g);
      full.arrive_expect_bytes(sizeof(QTile) * (a.project ? 2 : 1) + sizeof(StateTile));
      load_row_tile(s.phi[stage], maps.set.phi_q, at.m * kBlockQ, at.h, at.b, full);
      if (a.project) load_row_tile(s.dol[stage], maps.dout, at.m * kBlockQ, at.h, at.b, full);
      load_row_tile(s.h[stage], maps.set.set_h, 0, (at.b * g.heads + at.h) * g.q_blocks + at.m, 0, full);
    });
    return;
  }

  if constexpr (Registers::kHandOver) claim_registers_to<Registers::kConsumer>();
  const int consumer_thread = threadIdx.x - kWarpgroupThreads;
  const int warpgroup = consumer_thread / kWarpgroupThreads;
  const int warpgroup_row0 = warpgroup * kWarpgroupRows;
  const int quad = threadIdx.x % 4;
  // The thread's first row of the tiles (its second is 8 below), as in the accumulators.
  const int tile_row = consumer_thread / kWarpSize * kRowsPerWarp + threadIdx.x % kWarpSize / 4;
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    const int64_t pair = at.b * g.heads + at.h;
    const int64_t row0 = at.m * kBlockQ + tile_row;
    // den of the thread's rows and Z_m at its columns, read before the wait for the item's tiles (their
    // latency overlaps it).
    float den[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) den[r] = row0 + 8 * r < g.q_len ? a.denominator[pair * g.q_len + row0 + 8 * r] : 0.0f;
    float z[kTiles][2];
    const float* set_z = a.set_z + (pair * g.q_blocks + at.m) * kHeadDim + 2 * quad;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      const float2 pair_z = *reinterpret_cast<const float2*>(set_z + 8 * j);
      z[j][0] = pair_z.x;
      z[j][1] = pair_z.y;
    }
    const bool empty = a.set_size[pair * g.q_blocks + at.m] == 0;  // U_m is empty: Ol = 0, and no gradient flows
    s.item.wait_full(use);
    const int stage = s.item.stage(use);
    auto &phi_tile = s.phi[stage], &dol_tile = s.dol[stage];
    const auto& h_tile = s.h[stage];
    float* row_dots = s.row_dots[stage];
    float inverse[2];  // 1 / den, 0 past the sequence and for an empty U_m
#pragma unroll
    for (int r = 0; r < 2; ++r) inverse[r] = row0 + 8 * r < g.q_len && !empty ? 1.0f / den[r] : 0.0f;

    {  // dOl = dO W (+ the returned Ol's gradient) over dO, in the input dtype: this warpgroup's rows
      float dol[kTiles][4] = {};
      if (a.project) {
        s.w_full.wait(0);
        fence_accumulators(dol);  // zeroed before the product reads them: else ptxas serialises the products
        wgmma_fence();
        issue_rows_times<1, StateRead::as_stored>(dol, dol_tile, s.w, warpgroup_row0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_accumulators(dol);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = row0 + 8 * r;
        const bool returned = a.dout_linear.defined() && row < g.q_len;
#pragma unroll
        for (int j = 0; j < kTiles; ++j) {
          const float2 extra = returned ? load_pair(a.dout_linear, at.b, at.h, row, j * 8 + 2 * quad)
                                        : make_float2(0.0f, 0.0f);
          dol_tile.accumulator_pair(tile_row + 8 * r, j) =
              pack2<Element>(dol[j][2 * r] + extra.x, dol[j][2 * r + 1] + extra.y);
        }
      }
    }
    fence_shared_for_async_proxy();
    named_barrier_sync(1 + warpgroup, kWarpgroupThreads);

    // P = dOl H_mᵀ and O = φ(Q_m) H_m (for dW), both times den. O is formed without a projection too: a product issued under a condition makes ptxas
    // serialise all of them (C7515).
    float grad[kTiles][4] = {};
    float out[kTiles][4] = {};
    fence_accumulators(grad);
    fence_accumulators(out);
    wgmma_fence();
    issue_rows_times<1, StateRead::transposed>(grad, dol_tile, h_tile, warpgroup_row0);
    issue_rows_times<1, StateRead::as_stored>(out, phi_tile, h_tile, warpgroup_row0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(grad);
    fence_accumulators(out);

    if (a.ol_low) {  // Ol on every row of the block (0 past the sequence), for dW
      Element* ol = a.ol_low + (pair * g.q_rows() + row0) * kHeadDim + 2 * quad;
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < kTiles; ++j)
          *reinterpret_cast<uint32_t*>(ol + 8 * r * kHeadDim + 8 * j) =
              pack2<Element>(out[j][2 * r] * inverse[r], out[j][2 * r + 1] * inverse[r]);
    }

    // c_i = φ(q_i)·P_i / den_i²; dQφ = P / den − c Z_m, through φ into dq.
    float phi[kTiles][4];
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float2 pair_phi = unpack2<Element>(phi_tile.accumulator_pair(tile_row + 8 * r, j));
        phi[j][2 * r] = pair_phi.x;
        phi[j][2 * r + 1] = pair_phi.y;
      }
    float dots[2];
    accumulator_row_dots<kHeadDim>(phi, grad, dots);
    float c[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      c[r] = dots[r] * inverse[r] * inverse[r];
      if (quad == 0) row_dots[tile_row + 8 * r] = dots[r] * inverse[r];
    }
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) grad[j][e] = grad[j][e] * inverse[e / 2] - c[e / 2] * z[j][e % 2];
    feature_map_backward<kHeadDim>(a.feature_map, phi, grad);
#pragma unroll
    for (int j = 0; j < kTiles; ++j)  // φ / den over φ: A of dH_m (every product reading φ is done)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        phi_tile.accumulator_pair(tile_row + 8 * r, j) =
            pack2<Element>(phi[j][2 * r] * inverse[r], phi[j][2 * r + 1] * inverse[r]);
    fence_shared_for_async_proxy();
    // dq = the sparse branch's dq rows + this, in the output dtype.
    store_sum_with_rows(a.dq, at.b, at.h, row0, g.q_len, a.dq_rows + (pair * g.q_rows() + row0) * kHeadDim + 2 * quad,
                        kHeadDim, grad);
    named_barrier_sync(1 + Config::kConsumers, kConsumerThreads);  // every row of φ / den, dOl and row_dots

    // dH_m = (φ(Q_m) / den)ᵀ dOl, 64 features per product: A (f, i) and B (i, d) both read from rows along K.
    for (int block = warpgroup; block < kHeadDim / kWarpgroupRows; block += Config::kConsumers) {
      float dh[kTiles][4] = {};
      fence_accumulators(dh);
      wgmma_fence();
      issue_columns_times(dh, phi_tile, block, dol_tile);
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulators(dh);
      const int feature = block * kWarpgroupRows + tile_row % kWarpgroupRows;
      const int64_t tile = pair / g.group() * a.dh_pair_tiles + pair % g.group() * g.q_blocks + at.m;
      const int64_t at_feature = (tile * kHeadDim + feature) * kHeadDim + 2 * quad;
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < kTiles; ++j)
          *reinterpret_cast<uint32_t*>(a.dh_low + at_feature + 8 * r * kHeadDim + 8 * j) =
              pack2<Element>(dh[j][2 * r], dh[j][2 * r + 1]);
    }
    {  // dZ_m = −Σ_i c_i φ(q_i) = −Σ_i (c_i den_i) (φ(q_i) / den_i): kSplits neighbouring threads share a
       // pair of features, each the rows i ≡ its split (mod kSplits), and add up by shuffles.
      constexpr int kSplits = kConsumerThreads / (kHeadDim / 2);
      static_assert(kSplits >= 1 && kSplits <= kWarpSize && (kSplits & (kSplits - 1)) == 0, "splits within a warp");
      const int feature = consumer_thread / kSplits * 2, split = consumer_thread % kSplits;
      float2 sum = make_float2(0.0f, 0.0f);
      for (int i = split; i < kBlockQ; i += kSplits) {
        const auto* unit = phi_tile.unit(i, feature / 8);
        const float2 phi = unpack2<Element>(*reinterpret_cast<const uint32_t*>(unit + feature % 8));
        sum.x += row_dots[i] * phi.x;
        sum.y += row_dots[i] * phi.y;
      }
#pragma unroll
      for (int offset = kSplits / 2; offset > 0; offset /= 2) {
        sum.x += __shfl_xor_sync(0xffffffffu, sum.x, offset);
        sum.y += __shfl_xor_sync(0xffffffffu, sum.y, offset);
      }
      if (split == 0)
        *reinterpret_cast<float2*>(a.dz_query + (pair * g.q_blocks + at.m) * kHeadDim + feature) =
            make_float2(-sum.x, -sum.y);
    }
    s.item.release(use);  // every read of this item's tiles is complete
  }
#endif
}

}  // namespace

const char* linear_query_grads_wgmma(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                     FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                     const LinearSetOperands& operands, const LinearQueryGradArgs& args,
                                     cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "linear_query_grads_wgmma: fixed feature maps only");
  const char* refusal = nullptr;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    using Config = WgmmaQueryGrads<Element, D, BQ>;
    const auto kernel = linear_query_grads_wgmma_kernel<Element, D, BQ>;
    static const bool available = loaded_for_hopper(kernel);
    refusal = hopper_kernel_refusal(available, Config::kSharedBytes);
    if (refusal != nullptr) return;
    QueryGradMaps maps{};
    if (args.weight && !make_row_tile_map(args.dout, BQ, &maps.dout)) {
      refusal = "dout's rows do not suit the tile copy engine";
      return;
    }
    maps.set = linear_set_maps(g, q.dtype, operands);
    prepare_linear_set_operands(g, plan, q, feature_map, scope, states, args.weight, operands, stream);

    const QueryGradKernelArgs<Element> kernel_args{feature_map,
                                                   operands.denominator,
                                                   operands.set_z,
                                                   operands.set_size,
                                                   args.weight != nullptr,
                                                   DeviceView<const Element>::of(args.dout_linear),
                                                   static_cast<Element*>(args.ol_low),
                                                   args.dq_rows,
                                                   DeviceView<Element>::of(args.dq),
                                                   static_cast<Element*>(args.dh_low),
                                                   set_rows_padded(g),
                                                   args.dz_query};
    const auto grid = static_cast<unsigned>(std::min<int64_t>(items, multiprocessor_count() * Config::kBlocksPerSm));
    launch_with_shared(kernel, grid, Config::kThreads, Config::kSharedBytes, stream, maps, g, kernel_args);
    SLATTN_LAUNCH_CHECK("linear_query_grads_wgmma_kernel");
  });
  return refusal;
}

}  // namespace slattn::cuda
