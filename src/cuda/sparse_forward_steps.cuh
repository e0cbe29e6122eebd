// The steps the sparse forwards share (sparse_forward_mma.cu for sm_80+,
// sparse_forward_wgmma.cu and sparse_forward_quantized.cu for sm_90a): the
// online softmax over one tile of scores and the epilogue, for one warp's 16
// query rows held as mma accumulators (rows group and group + 8, columns
// 2 quad + {0, 1}).
#pragma once

#include <cfloat>

#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "cuda/sparse_kernels.h"
#include "cuda/tile_mma.cuh"

namespace slattn::cuda {

// Which score tiles are masked key by key: every one, or only one that
// reaches past the sequence (its last). The check costs a branch per tile
// and registers: the mma.sync kernel, capped at 128, keeps `every_tile`.
enum class KeyMask { every_tile, partial_tiles };

// Masks keys at or past `end` (the tile's keys start at `first`), moves the
// running maxima (log2 units) by the tile's, turns the scores into
// P = exp2(scale · S - max) and rescales the running sums; `correction`
// receives the factor by which the output accumulators are to be rescaled
// (rescale_rows). The scores come in unscaled: their row maxima (minima for
// a negative scale) give the tile's maxima, and one fused multiply-add per
// score its exponent. With an `exponent_offset` c, P and the sums are 2^c
// times larger (the low-bit kernel's P at the scale of its e4m3 format), at
// no cost per score.
template <KeyMask kMask, int kKeyTiles8>
__device__ __forceinline__ void softmax_scores(float (&score)[kKeyTiles8][4], float (&row_max)[2],
                                               float (&row_sum)[2], int64_t first, int64_t end, float scale_log2,
                                               float (&correction)[2], float exponent_offset = 0.0f) {
  const int quad = (threadIdx.x % kWarpSize) % 4;
  // A zero scale (the low-bit kernel's step of a key block whose keys are all equal) would give
  // masked scores 0 · inf; the smallest normal scale gives the same P.
  if (scale_log2 == 0.0f) scale_log2 = FLT_MIN;
  const bool positive = scale_log2 > 0.0f;
  if (kMask == KeyMask::every_tile || end - first < kKeyTiles8 * 8) {
    const float masked = positive ? -INFINITY : INFINITY;  // exp2 of scale times it is 0
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (first + j * 8 + 2 * quad + (e & 1) >= end) score[j][e] = masked;
  }
  float extreme[2];  // of the unscaled scores: what scaling turns into the maximum
  if (positive) {
    extreme[0] = extreme[1] = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) extreme[e / 2] = fmaxf(extreme[e / 2], score[j][e]);
  } else {
    extreme[0] = extreme[1] = INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTiles8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) extreme[e / 2] = fminf(extreme[e / 2], score[j][e]);
  }
  float anchor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int lanes = 1; lanes <= 2; lanes *= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, extreme[r], lanes);
      extreme[r] = positive ? fmaxf(extreme[r], other) : fminf(extreme[r], other);
    }
    const float new_max = fmaxf(row_max[r], extreme[r] * scale_log2);  // finite: the tile's first key is valid
    correction[r] = fast_exp2(row_max[r] - new_max);
    row_max[r] = new_max;
    row_sum[r] *= correction[r];
    anchor[r] = new_max - exponent_offset;
  }
#pragma unroll
  for (int j = 0; j < kKeyTiles8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      score[j][e] = fast_exp2(fmaf(score[j][e], scale_log2, -anchor[e / 2]));
      row_sum[e / 2] += score[j][e];  // this thread's share; summed over the quad at the end
    }
  }
}

// Accumulator rows group and group + 8 multiplied by correction[0] and [1].
template <int kTiles8>
__device__ __forceinline__ void rescale_rows(float (&acc)[kTiles8][4], const float (&correction)[2]) {
#pragma unroll
  for (int j = 0; j < kTiles8; ++j) {
    acc[j][0] *= correction[0];
    acc[j][1] *= correction[0];
    acc[j][2] *= correction[1];
    acc[j][3] *= correction[1];
  }
}

// One step of the online softmax: softmax_scores, then the output rescaled.
template <KeyMask kMask, int kKeyTiles8, int kDimTiles8>
__device__ __forceinline__ void online_softmax_step(float (&score)[kKeyTiles8][4], float (&out)[kDimTiles8][4],
                                                    float (&row_max)[2], float (&row_sum)[2], int64_t first,
                                                    int64_t end, float scale_log2, float exponent_offset = 0.0f) {
  float correction[2];
  softmax_scores<kMask>(score, row_max, row_sum, first, end, scale_log2, correction, exponent_offset);
  rescale_rows(out, correction);
}

// The end of the warp's rows (from `warp_row0` on): each row's sum over its
// quad, its LSE written (natural log; -inf for a row with no critical key),
// and the factor that normalises its output (0 for such a row).
__device__ __forceinline__ void finish_forward_rows(const Geometry& g, const SparseForwardArgs& a, int64_t pair,
                                                    int64_t warp_row0, const float (&row_max)[2],
                                                    float (&row_sum)[2], float (&inverse)[2]) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const int64_t row = warp_row0 + group + 8 * r;
    const bool any = row_sum[r] > 0.0f;
    inverse[r] = any ? 1.0f / row_sum[r] : 0.0f;
    if (quad == 0 && row < g.q_len)
      a.lse[pair * g.q_len + row] = any ? (row_max[r] + __log2f(row_sum[r])) * kLn2 : -INFINITY;
  }
}

// Normalises the warp's rows (from `warp_row0` on) and writes Os to every
// destination the caller asked for (out, out_sparse, padded fp32 rows) and
// the LSE (finish_forward_rows).
template <typename Element, int kHeadDim>
__device__ __forceinline__ void store_forward_rows(const Geometry& g, const SparseForwardArgs& a, int64_t b,
                                                   int64_t h, int64_t warp_row0, float (&out)[kHeadDim / 8][4],
                                                   const float (&row_max)[2], float (&row_sum)[2]) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, quad = lane % 4;
  const int64_t pair = b * g.heads + h;
  const auto out_view = DeviceView<Element>::of(a.out);
  const auto sparse_view = DeviceView<Element>::of(a.out_sparse);
  float inverse[2];
  finish_forward_rows(g, a, pair, warp_row0, row_max, row_sum, inverse);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = warp_row0 + group + 8 * r;
    if (row >= g.q_len) continue;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      const int d = j * 8 + 2 * quad;
      const float value0 = out[j][2 * r] * inverse[r], value1 = out[j][2 * r + 1] * inverse[r];
      if (out_view.defined()) store_pair(out_view, b, h, row, d, value0, value1);
      if (sparse_view.defined()) store_pair(sparse_view, b, h, row, d, value0, value1);
      if (a.os_rows) {
        a.os_rows[(pair * g.q_rows() + row) * kHeadDim + d] = value0;
        a.os_rows[(pair * g.q_rows() + row) * kHeadDim + d + 1] = value1;
      }
    }
  }
}

}  // namespace slattn::cuda
