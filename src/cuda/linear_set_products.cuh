// The warpgroup products of the Hopper linear kernels (linear_forward_wgmma.cu,
// linear_backward_wgmma.cu): the warpgroup's 64 rows of a row tile (φ(Q),
// dO or dOl, read K-major) times a D x D state tile (h_n, H or W) read as
// stored, rows along K (MN-major, as V is in P V), or transposed (K-major).
// Issued, not committed.
#pragma once

#include <type_traits>

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

}  // namespace slattn::cuda
