// The steps the warp-specialised Hopper kernels (sparse and linear forward)
// share: a row tile copied by the tile copy engine, S = A Bᵀ of two K-major
// tiles, and O += P V with P in registers and V read MN-major.
#pragma once

#include <type_traits>

#include "cuda/tensor_map.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {

template <typename Tile, typename Map>
__device__ __forceinline__ void load_row_tile(Tile& tile, const Map& map, int64_t row, int64_t h, int64_t b,
                                              SharedBarrier& full) {
  static_assert(Tile::kChunkCols == kRowTileBoxCols, "a box is a column chunk");
#pragma unroll
  for (int chunk = 0; chunk < Tile::kChunks; ++chunk)
    tma_load(tile.chunk(chunk), map.map, map.at(chunk * kRowTileBoxCols, row, h, b), full);
}

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

}  // namespace slattn::cuda
