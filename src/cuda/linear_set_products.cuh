// The warpgroup products of the Hopper linear kernels (linear_forward_wgmma.cu,
// linear_backward_wgmma.cu): the warpgroup's 64 rows of a row tile (φ(Q),
// dO or dOl, read K-major) times a D x D state tile (H_m, dh_n or W) read as
// stored, rows along K (MN-major, as V is in P V), or transposed (K-major);
// a tile's columns times another's (issued, not committed); and the
// projection Ol Wᵀ from register fragments.
#pragma once

#include <type_traits>
#include <utility>

#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {

enum class StateRead { as_stored, transposed };

// acc += kSign rows · X (kRead: as_stored) or rows · Xᵀ (transposed).
template <int kSign, StateRead kRead, typename RowTile, typename StateTile, int kTiles>
__device__ __forceinline__ void issue_rows_times(float (&acc)[kTiles][4], const RowTile& rows, const StateTile& state,
                                                 int row0) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(rows.data[0])>>;
  constexpr bool kTransposed = kRead == StateRead::transposed;
  uint64_t rows_desc = k_major_descriptor(rows);
  const uint64_t state_desc = kTransposed ? k_major_descriptor(state) : mn_major_descriptor(state);
  opaque(rows_desc);
#pragma unroll
  for (int step = 0; step < RowTile::kChunks * RowTile::kChunkCols / 16; ++step) {
    const uint64_t state_step = kTransposed ? k_major_offset<StateTile>(0, step) : mn_major_offset(step);
    wgmma_ss<Element, kTiles * 8, 0, kTransposed ? 0 : 1, kSign>(
        acc, rows_desc + k_major_offset<RowTile>(row0, step), state_desc + state_step, true);
  }
}

// acc += (columns 64 chunk .. 64 chunk + 63 of `left`)ᵀ · right, both tiles
// read with their rows along K (MN-major): h_n = φ(K_n)ᵀ V_n,
// dH_m = (φ(Q_m) / den)ᵀ dOl, dW = dOᵀ Ol.
template <typename LeftTile, typename RightTile, int kTiles>
__device__ __forceinline__ void issue_columns_times(float (&acc)[kTiles][4], const LeftTile& left, int chunk,
                                                    const RightTile& right) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(left.data[0])>>;
  static_assert(sizeof(LeftTile) / LeftTile::kChunks == sizeof(RightTile) / RightTile::kChunks,
                "the same rows (K) in both tiles");
  uint64_t left_desc = mn_major_descriptor(left);
  opaque(left_desc);
  const uint64_t right_desc = mn_major_descriptor(right);
  constexpr int kRows = LeftTile::kChunkBytes / kSwizzleBytes;
#pragma unroll
  for (int step = 0; step < kRows / 16; ++step)
    wgmma_ss<Element, kTiles * 8, 1, 1>(acc, left_desc + ((chunk * LeftTile::kChunkBytes) >> 4) + mn_major_offset(step),
                                        right_desc + mn_major_offset(step), true);
}

// projected = Ol Wᵀ with Ol in registers (A) and W (out, in) read K-major. Issued and committed.
template <typename StateTile, int kDimTiles8>
__device__ __forceinline__ void issue_projection(float (&projected)[kDimTiles8][4],
                                                 const uint32_t (&ol)[kDimTiles8 / 2][4], const StateTile& w) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(w.data[0])>>;
  uint64_t w_desc = k_major_descriptor(w);
  opaque(w_desc);
#pragma unroll
  for (int step = 0; step < kDimTiles8 / 2; ++step)
    wgmma_rs<Element, kDimTiles8 * 8, 0>(projected, ol[step], w_desc + k_major_offset<StateTile>(0, step), step > 0);
  wgmma_commit();
}

}  // namespace slattn::cuda
