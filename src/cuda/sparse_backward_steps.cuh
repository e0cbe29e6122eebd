// The steps both sparse backward mainloops share (sparse_backward_mma.cu for
// sm_80+, sparse_backward_wgmma.cu for sm_90a), for one warp's 16 rows held
// as mma accumulators (rows group and group + 8, columns 2 quad + {0, 1}).
// P comes back from the forward's LSE; dS = P (dP - D).
#pragma once

#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "cuda/sparse_kernels.h"
#include "cuda/tile_mma.cuh"

namespace slattn::cuda {

// The LSE (log2 units; +inf past the sequence, so that P = 0 there) and D_i
// of this thread's two query rows, the warp's rows starting at `warp_row0` of
// the (b, h) pair `pair`.
__device__ __forceinline__ void load_query_row_stats(const Geometry& g, const SparseBackwardArgs& a, int64_t pair,
                                                     int64_t warp_row0, float (&lse_log2)[2], float (&delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = warp_row0 + accumulator_row(2 * r);
    lse_log2[r] = row < g.q_len ? a.lse[pair * g.q_len + row] * kLog2e : INFINITY;
    delta[r] = a.delta[pair * g.q_rows() + row];
  }
}

// The same for the kTile queries [first, end) of a tile, into shared arrays (by kThreads threads).
template <int kTile, int kThreads>
__device__ __forceinline__ void load_query_tile_stats(const Geometry& g, const SparseBackwardArgs& a, int64_t pair,
                                                      int64_t first, int64_t end, float* lse_log2, float* delta) {
  for (int r = threadIdx.x; r < kTile; r += kThreads) {
    const bool valid = first + r < end;
    lse_log2[r] = valid ? a.lse[pair * g.q_len + first + r] * kLog2e : INFINITY;
    delta[r] = valid ? a.delta[pair * g.q_rows() + first + r] : 0.0f;
  }
}

// dQ's step: S (query rows x keys [first, end)) becomes P, dP becomes dS.
template <int kTiles8>
__device__ __forceinline__ void score_grads(float (&p)[kTiles8][4], float (&ds)[kTiles8][4], int64_t first,
                                            int64_t end, float scale_log2, const float (&lse_log2)[2],
                                            const float (&delta)[2]) {
#pragma unroll
  for (int j = 0; j < kTiles8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool valid = first + accumulator_col(j, e) < end;
      p[j][e] = valid ? fast_exp2(p[j][e] * scale_log2 - lse_log2[e / 2]) : 0.0f;
      ds[j][e] = p[j][e] * (ds[j][e] - delta[e / 2]);
    }
  }
}

// dK/dV's step: Sᵀ (keys x queries of a tile, whose stats are in shared
// arrays) becomes Pᵀ, dPᵀ becomes dSᵀ.
template <int kTiles8>
__device__ __forceinline__ void score_grads_transposed(float (&pt)[kTiles8][4], float (&dst)[kTiles8][4],
                                                       float scale_log2, const float* lse_log2, const float* delta) {
#pragma unroll
  for (int j = 0; j < kTiles8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query = accumulator_col(j, e);
      pt[j][e] = fast_exp2(pt[j][e] * scale_log2 - lse_log2[query]);
      dst[j][e] = pt[j][e] * (dst[j][e] - delta[query]);
    }
  }
}

}  // namespace slattn::cuda
