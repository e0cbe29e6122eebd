// Two kernels: key_block_states_kernel loads K_n and V_n of one key block into
// shared memory, stages φ(K_n) chunk by chunk and multiplies on tf32 tensor cores;
// fused_linear_output_kernel sums H_m and Z_m of one query block from those states
// (linear_tiles.cuh), stages φ(Q_m), and runs both of its products: φ(Q_m) H_m
// from shared memory, then Ol Wᵀ with Ol straight from the accumulators. fp32
// states and tf32 products; their FLOPs are few next to the sparse branch's.
#include "cuda/linear_forward_fused.h"
#include "cuda/linear_kernels.h"
#include "cuda/linear_tiles.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"

namespace slattn::cuda {
namespace {

constexpr int kKeyChunk = 32;  // keys whose φ is staged at once in key_block_states_kernel

template <int kDim>
constexpr int state_threads() { return kDim / kRowsPerWarp * kWarpSize; }  // one warp per 16 rows of h_n

template <typename Element, int kDim>
struct StateShared {
  float phi[kKeyChunk][kDim + kStatePad];  // φ of one chunk of keys
  float z_partial[kDim / kRowsPerWarp][kDim];
  // then K_n and V_n, block_k rows each: TileRow<Element, kDim>[2 * block_k]
};

template <typename Element, int kDim>
size_t state_shared_bytes(const Geometry& g) {
  return sizeof(StateShared<Element, kDim>) + 2 * g.block_k * sizeof(TileRow<Element, kDim>);
}

// grid: one block per (kv pair, key block); warp w computes rows 16w.. of h_n.
template <typename Element, int kDim>
__global__ void __launch_bounds__(state_threads<kDim>())
    key_block_states_kernel(Geometry g, DeviceView<const Element> k, DeviceView<const Element> v,
                            FeatureMap feature_map, KeyStates states, Element* low_states, Element* phi_k) {
  constexpr int kThreads = state_threads<kDim>(), kWarps = kThreads / kWarpSize;
  extern __shared__ __align__(16) unsigned char raw[];
  auto& s = *reinterpret_cast<StateShared<Element, kDim>*>(raw);
  auto* k_tile = reinterpret_cast<TileRow<Element, kDim>*>(raw + sizeof(StateShared<Element, kDim>));
  TileRow<Element, kDim>* v_tile = k_tile + g.block_k;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t column = blockIdx.x;  // kv pair * Nk + n
  const int64_t pair = column / g.k_blocks, n = column % g.k_blocks;
  const int64_t b = pair / g.kv_heads, h = pair % g.kv_heads;
  const int64_t first = n * g.block_k, end = min(g.k_len, first + g.block_k);
  const int rows = static_cast<int>(end - first);

  // Whole blocks, zero past the end: the last chunk's products read those rows of V.
  load_tile<Element, kDim, kThreads>(k, b, h, first, g.block_k, end, k_tile);
  load_tile<Element, kDim, kThreads>(v, b, h, first, g.block_k, end, v_tile);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float acc[kDim / 8][4] = {};
  WarpRow z{};  // this warp's share of z_n
  for (int chunk = 0; chunk < rows; chunk += kKeyChunk) {
    stage_phi_rows<Element, kDim>(k_tile, chunk, kKeyChunk, rows, feature_map, &s.phi[0][0], kDim + kStatePad,
                                  [&](int r, const WarpRow& phi) {
#pragma unroll
                                    for (int t = 0; t < kMaxPerLane; ++t) z.v[t] += phi.v[t];
                                    if (phi_k && chunk + r < rows)
                                      phi.store(phi_k + (pair * g.k_len + first + chunk + r) * kDim, kDim);
                                  });
    __syncthreads();
    // rows f of h_n: A (f, key) = φ(k_key)_f, B (key, d) = v_key,d; keys past the end are zero in both
    mma_tf32<kKeyChunk, kDim>(acc, SharedMatrix<float, 1, kDim + kStatePad>{&s.phi[0][warp * kRowsPerWarp]},
                              SharedMatrix<Element, kDim + kTilePad, 1>{&v_tile[chunk][0]});
    __syncthreads();  // the next chunk overwrites phi
  }

  float* h_out = states.h + (column * kDim + warp * kRowsPerWarp) * kDim;
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int p = 0; p < 2; ++p) accumulator_pair(h_out, kDim, j, p) = make_float2(acc[j][2 * p], acc[j][2 * p + 1]);
  if (low_states) {
    Element* low = low_states + (column * kDim + warp * kRowsPerWarp) * kDim;
#pragma unroll
    for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
      for (int p = 0; p < 2; ++p)
        *reinterpret_cast<uint32_t*>(low + accumulator_row(2 * p) * kDim + accumulator_col(j, 0)) =
            pack2<Element>(acc[j][2 * p], acc[j][2 * p + 1]);
  }
  z.store(s.z_partial[warp], kDim);
  __syncthreads();
  for (int f = threadIdx.x; f < kDim; f += kThreads) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += s.z_partial[w][f];  // a fixed order: deterministic
    states.z[column * kDim + f] = sum;
  }
}

// grid: (Mq, query pairs); warp w owns query rows 16w.. of the block.
template <typename Element, int kDim, int kBlockQ>
__global__ void __launch_bounds__(kBlockQ / kRowsPerWarp * kWarpSize, kQueryBlocksPerSm)
    fused_linear_output_kernel(Geometry g, RoutingPlanView plan, DeviceView<const Element> q, FeatureMap feature_map,
                               LinearScope scope, KeyStates states, const float* weight, const float* bias,
                               DeviceView<const Element> os, DeviceView<Element> out,
                               DeviceView<Element> out_linear) {
  using Shared = QueryBlockShared<Element, kDim, kBlockQ>;
  constexpr int kThreads = kBlockQ / kRowsPerWarp * kWarpSize;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);
  SubsetList list{reinterpret_cast<int32_t*>(raw + sizeof(Shared))};
  const int64_t m = blockIdx.x, pair = blockIdx.y;
  const int64_t b = pair / g.heads, h = pair % g.heads;
  const int64_t row0 = m * kBlockQ;
  const int local0 = threadIdx.x / kWarpSize * kRowsPerWarp;

  stage_query_block<Element, kDim, kBlockQ>(g, plan, q, feature_map, scope, states, b, h, m, s, list);
  float ol[kDim / 8][4];
  query_block_output<Element, kDim, kBlockQ>(g, row0, list.included > 0, s, ol);
  if (out_linear.defined()) {
#pragma unroll
    for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int64_t row = row0 + local0 + accumulator_row(2 * p);
        if (row < g.q_len) store_pair(out_linear, b, h, row, accumulator_col(j, 0), ol[j][2 * p], ol[j][2 * p + 1]);
      }
  }
  if (weight == nullptr) return;

  __syncthreads();  // every warp is done reading H_m: W takes its place
  load_matrix<kDim, kDim, kThreads>(weight, &s.weight[0][0], kDim + kRowPad);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // Ol Wᵀ in two halves of output columns (registers for two CTAs per SM):
  // A = Ol from the accumulators, B (i, o) = W[o][i].
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    constexpr int kHalf = kDim / 2;
    float projected[kHalf / 8][4] = {};
    mma_tf32_from_accumulators<kDim, kHalf>(
        projected, ol, SharedMatrix<float, 1, kDim + kRowPad>{&s.weight[half * kHalf][0]});
#pragma unroll
    for (int j = 0; j < kHalf / 8; ++j) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {  // out = Os + Ol Wᵀ + b
        const int64_t row = row0 + local0 + accumulator_row(2 * p);
        const int d = half * kHalf + accumulator_col(j, 0);
        if (row >= g.q_len) continue;
        const float2 sparse = load_pair(os, b, h, row, d);
        store_pair(out, b, h, row, d, sparse.x + projected[j][2 * p] + (bias ? bias[d] : 0.0f),
                   sparse.y + projected[j][2 * p + 1] + (bias ? bias[d + 1] : 0.0f));
      }
    }
  }
}

}  // namespace

void key_block_states(const Geometry& g, const TensorView& k, const TensorView& v, FeatureMap feature_map,
                      const KeyStates& states, void* low_states, void* phi_k, cudaStream_t stream) {
  SLATTN_CHECK(fused_linear_forward_supported(feature_map), "key_block_states: fixed feature maps only");
  dispatch_sparse_kernel(k.dtype, g, [&](auto tag, auto head_dim, auto, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value;
    launch_with_shared(key_block_states_kernel<Element, D>, static_cast<unsigned>(g.kv_pairs() * g.k_blocks),
                       state_threads<D>(), state_shared_bytes<Element, D>(g), stream, g,
                       DeviceView<const Element>::of(k), DeviceView<const Element>::of(v), feature_map, states,
                       static_cast<Element*>(low_states), static_cast<Element*>(phi_k));
  });
  SLATTN_LAUNCH_CHECK("key_block_states_kernel");
  const int64_t state = g.features * g.dim;
  column_sums(states.h, g.kv_pairs(), g.k_blocks, state, states.total_h, stream);
  column_sums(states.z, g.kv_pairs(), g.k_blocks, g.features, states.total_z, stream);
}

void linear_output_fused(const Geometry& g, const RoutingPlanView& plan, const TensorView& q, FeatureMap feature_map,
                         LinearScope scope, const KeyStates& states, const float* weight, const float* bias,
                         const TensorView& os, const TensorView& out, const TensorView& out_linear,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.q_pairs()));
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    launch_with_shared(fused_linear_output_kernel<Element, D, BQ>, grid, BQ / kRowsPerWarp * kWarpSize,
                       query_block_shared_bytes<Element, D, BQ>(g), stream, g, plan, DeviceView<const Element>::of(q),
                       feature_map, scope, states, weight, bias, DeviceView<const Element>::of(os),
                       DeviceView<Element>::of(out), DeviceView<Element>::of(out_linear));
  });
  SLATTN_LAUNCH_CHECK("fused_linear_output_kernel");
}

}  // namespace slattn::cuda
