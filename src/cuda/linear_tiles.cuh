// The shared-memory stages that the fused linear-branch kernels (forward and
// backward, fixed feature maps, F = D) have in common: φ of rows of a tile,
// and the query block's φ(Q_m), Z_m, denominators and H_m. Products run on
// tf32 tensor cores (tile_tf32.cuh). States stay fp32; φ of a 128-row tile is
// kept in the input dtype, as the composite rounds it, so that two query
// blocks fit one SM.
#pragma once

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/linear_states.h"
#include "cuda/row_ops.cuh"
#include "cuda/subset_list.cuh"
#include "cuda/tile_mma.cuh"
#include "cuda/tile_tf32.cuh"

namespace slattn::cuda {

inline constexpr int kStatePad = 8;  // pads shared matrices read as B (k + c, n + g): banks 8c + g
inline constexpr int kRowPad = 4;    // pads shared matrices read as A (g, k + c): banks 4g + c
inline constexpr int kQueryBlocksPerSm = 2;  // shared memory allows two query blocks per SM; registers must too

// φ of tile rows [first, first + count) into rows phi[0..count) (`pitch`
// elements apart; fp32, or the tile's own type, in place if phi == tile + first),
// warp w taking rows w, w + warps, ...; rows from `valid` on are zero (also
// under softmax and elu). Then on_row(r, φ row) in fp32, for sums over rows.
template <typename Element, int kDim, typename Out, typename OnRow>
__device__ void stage_phi_rows(const TileRow<Element, kDim>* tile, int first, int count, int valid,
                               FeatureMap feature_map, Out* phi, int pitch, OnRow&& on_row) {
  const int warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  for (int r = warp; r < count; r += warps) {
    WarpRow mapped{};
    if (first + r < valid) {
      WarpRow x;
      x.load(tile[first + r], kDim);
      mapped = feature_map_row(feature_map, x, kDim);
    }
    mapped.store(phi + r * pitch, kDim);  // each lane stores the elements it loaded: in place is safe
    on_row(r, mapped);
  }
}

// Starts asynchronous copies of a (kRows x kCols) fp32 row-major matrix into
// shared rows `pitch` floats apart (16-byte copies when aligned; plain loads
// otherwise). Complete after cp_async_wait and a barrier.
template <int kRows, int kCols, int kThreads>
__device__ void load_matrix(const float* src, float* shared, int pitch) {
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    for (int i = threadIdx.x; i < kRows * kCols / 4; i += kThreads)
      cp_async<16>(shared + (4 * i / kCols) * pitch + 4 * i % kCols, src + 4 * i, 16);
  } else {
    for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) shared[(i / kCols) * pitch + i % kCols] = src[i];
  }
}

template <typename Element, int kDim, int kBlockQ>
struct QueryBlockShared {
  union {
    TileRow<Element, kDim> q[kBlockQ];    // Q_m as loaded
    TileRow<Element, kDim> phi[kBlockQ];  // then φ(Q_m) in place, rounded as the inputs are: A operands
  };
  union {
    float state[kDim][kDim + kStatePad];    // H_m: B operand
    float weight[kDim][kDim + kRowPad];     // then W (forward): B (i, o) = W[o][i]
    float grad[kBlockQ][kDim + kStatePad];  // or G = dOl / den (backward)
  };
  float z[kDim];               // Z_m
  float denominator[kBlockQ];  // φ(q)·Z_m + ε, from φ in fp32
  float c[kBlockQ];            // (dOl·Ol) / den (backward)
  // then the subset list: subset_list_bytes(Nk)
};

template <typename Element, int kDim, int kBlockQ>
size_t query_block_shared_bytes(const Geometry& g) {
  return sizeof(QueryBlockShared<Element, kDim, kBlockQ>) + subset_list_bytes(g.k_blocks);
}

// Query block m of pair (b, h): loads Q_m, lists U_m (into `list`, whose rows
// follow the struct), and fills phi = φ(Q_m), z = Z_m, denominator and
// state = H_m. Ends synchronised.
template <typename Element, int kDim, int kBlockQ>
__device__ void stage_query_block(const Geometry& g, const RoutingPlanView& plan, const DeviceView<const Element>& q,
                                  FeatureMap feature_map, LinearScope scope, const KeyStates& states, int64_t b,
                                  int64_t h, int64_t m, QueryBlockShared<Element, kDim, kBlockQ>& s,
                                  SubsetList& list) {
  constexpr int kThreads = kBlockQ / kRowsPerWarp * kWarpSize;
  constexpr int64_t kState = int64_t(kDim) * kDim;
  const int64_t pair = b * g.heads + h, kv_pair = g.kv_pair_of(pair);
  const int64_t row0 = m * kBlockQ;
  const int lane = threadIdx.x % kWarpSize;

  load_tile<Element, kDim, kThreads>(q, b, h, row0, kBlockQ, g.q_len, s.q);
  cp_async_commit();
  const int8_t* map = plan.block_map + (pair * g.q_blocks + m) * g.k_blocks;
  build_subset_list(g.k_blocks, [&](int64_t n) { return in_linear_set(map[n], scope); }, list);
  for (int f = threadIdx.x; f < kDim; f += kThreads)
    s.z[f] = subset_sum(list, states.z + kv_pair * g.k_blocks * kDim, kDim, states.total_z + kv_pair * kDim, f);
  cp_async_wait<0>();
  __syncthreads();  // Q_m, Z_m and the list are complete

  WarpRow z;
  z.load(s.z, kDim);
  const int valid = static_cast<int>(min(int64_t(kBlockQ), g.q_len - row0));
  stage_phi_rows<Element, kDim>(s.q, 0, kBlockQ, valid, feature_map, &s.phi[0][0], kDim + kTilePad,
                                [&](int r, const WarpRow& phi) {
                                  const float denominator = phi.dot(z) + static_cast<float>(kLinearEpsilon);
                                  if (lane == 0) s.denominator[r] = denominator;
                                });
  subset_sum_to_shared<kDim, kDim, kThreads>(list, states.h + kv_pair * g.k_blocks * kState,
                                             states.total_h + kv_pair * kState, &s.state[0][0], kDim + kStatePad,
                                             /*accumulate=*/false);
  __syncthreads();
}

// This warp's rows of Ol = φ(Q_m) H_m / den, 0 on pad rows and where U_m is empty.
template <typename Element, int kDim, int kBlockQ>
__device__ void query_block_output(const Geometry& g, int64_t row0, bool non_empty,
                                   const QueryBlockShared<Element, kDim, kBlockQ>& s, float (&ol)[kDim / 8][4]) {
  const int local0 = threadIdx.x / kWarpSize * kRowsPerWarp;
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) ol[j][e] = 0.0f;
  mma_tf32<kDim, kDim>(ol, SharedMatrix<Element, kDim + kTilePad, 1>{&s.phi[local0][0]},
                       SharedMatrix<float, kDim + kStatePad, 1>{&s.state[0][0]});
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = local0 + accumulator_row(e);
      ol[j][e] = non_empty && row0 + r < g.q_len ? ol[j][e] / s.denominator[r] : 0.0f;
    }
  }
}

// Σ over this warp's columns of x ⊙ y for its two accumulator rows (g and
// g + 8), summed over the quad that shares them; y_at(j, e) is y at the
// accumulator position (j, e).
template <int kCols, typename YAt>
__device__ __forceinline__ void accumulator_row_dots_at(const float (&x)[kCols / 8][4], YAt&& y_at,
                                                        float (&dot)[2]) {
  dot[0] = dot[1] = 0.0f;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dot[e / 2] += x[j][e] * y_at(j, e);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 1);
    dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], 2);
  }
}

// The same with y held at the accumulator positions.
template <int kCols>
__device__ __forceinline__ void accumulator_row_dots(const float (&x)[kCols / 8][4], const float (&y)[kCols / 8][4],
                                                     float (&dot)[2]) {
  accumulator_row_dots_at<kCols>(x, [&](int j, int e) { return y[j][e]; }, dot);
}

// acc += a row vector on every row: x points at the vector's column
// 2 (lane % 4), the thread's first accumulator column (dz_n added to dKφ).
template <int kTiles>
__device__ __forceinline__ void add_to_every_row(float (&acc)[kTiles][4], const float* x) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    const float2 pair = *reinterpret_cast<const float2*>(x + 8 * j);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      acc[j][2 * r] += pair.x;
      acc[j][2 * r + 1] += pair.y;
    }
  }
}

// In place, dφ -> dx through the fixed feature maps (SPEC section 5), from φ
// alone: softmax φ ⊙ (dφ − dφ·φ); elu+1 has φ = exp(x) <= 1 for x <= 0 and
// φ = x + 1 > 1 above, so dx = dφ · min(φ, 1); relu dx = dφ where φ > 0.
// phi_at(j, e) is φ at this thread's accumulator position (j, e) (read on
// each use: a caller may read it from shared memory rather than hold it).
template <int kDim, typename PhiAt>
__device__ __forceinline__ void feature_map_backward_at(FeatureMap feature_map, PhiAt&& phi_at,
                                                        float (&grad)[kDim / 8][4]) {
  float inner[2] = {0.0f, 0.0f};
  if (feature_map == FeatureMap::softmax) accumulator_row_dots_at<kDim>(grad, phi_at, inner);
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = phi_at(j, e), d = grad[j][e];
      grad[j][e] = feature_map == FeatureMap::softmax ? p * (d - inner[e / 2])
                   : feature_map == FeatureMap::elu   ? d * fminf(p, 1.0f)
                                                      : (p > 0.0f ? d : 0.0f);
    }
  }
}

// The same with φ held at the accumulator positions of this warp's rows.
template <int kDim>
__device__ __forceinline__ void feature_map_backward(FeatureMap feature_map, const float (&phi)[kDim / 8][4],
                                                     float (&grad)[kDim / 8][4]) {
  feature_map_backward_at<kDim>(feature_map, [&](int j, int e) { return phi[j][e]; }, grad);
}

// Loads this warp's rows of a shared matrix at the accumulator positions, as fp32.
template <int kCols, typename T>
__device__ __forceinline__ void load_accumulator_rows(const T* shared, int pitch, float (&out)[kCols / 8][4]) {
  const int local0 = threadIdx.x / kWarpSize * kRowsPerWarp;
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      out[j][e] = to_float(shared[(local0 + accumulator_row(e)) * pitch + accumulator_col(j, e)]);
}

}  // namespace slattn::cuda
