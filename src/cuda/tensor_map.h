// Tensor maps (the copy engine's descriptors, tma.cuh) for tiles of whole rows
// of a (B, H, L, D) tensor of 2-byte elements: boxes of (rows x 64) elements,
// 128-byte swizzled, rows past L read as zeros. Any layout whose rows are
// contiguous and whose strides are multiples of 16 bytes qualifies (HND, NHD,
// and slices of them); the map orders the three row axes by stride.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/tma.cuh"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

inline constexpr int kRowTileBoxCols = 64;  // one 128-byte swizzle row of 2-byte elements

struct RowTileMap {
  CUtensorMap map;
  int32_t length_axis, head_axis, batch_axis;  // where L, H and B sit among the map's axes 1..3

  // The box whose first element is x[b, h, row, col].
  __device__ __forceinline__ TileCoordinates at(int32_t col, int64_t row, int64_t h, int64_t b) const {
    TileCoordinates at{{col, 0, 0, 0}};
#pragma unroll
    for (int axis = 1; axis < 4; ++axis)
      at.c[axis] = static_cast<int32_t>(axis == length_axis ? row : axis == head_axis ? h : b);
    return at;
  }
};

// Starts copying rows [row, row + rows) of the (b, h) slice described by
// `map` into `tile` (a SwizzledTile, one box per column chunk), completing
// on `full`.
template <typename Tile>
__device__ __forceinline__ void load_row_tile(Tile& tile, const RowTileMap& map, int64_t row, int64_t h, int64_t b,
                                              SharedBarrier& full) {
  static_assert(Tile::kChunkCols == kRowTileBoxCols, "a box is a column chunk");
#pragma unroll
  for (int chunk = 0; chunk < Tile::kChunks; ++chunk)
    tma_load(tile.chunk(chunk), map.map, map.at(chunk * kRowTileBoxCols, row, h, b), full);
}

// Starts copying rows [tile_row, tile_row + box rows) of `tile` (a
// SwizzledTile) to rows [row, ...) of the (b, h) slice described by `map`
// (made for boxes of that many rows; rows past L are left out), in the
// calling thread's current bulk group.
template <typename Tile>
__device__ __forceinline__ void store_row_tile(const RowTileMap& map, const Tile& tile, int tile_row, int64_t row,
                                               int64_t h, int64_t b) {
  static_assert(Tile::kChunkCols == kRowTileBoxCols, "a box is a column chunk");
#pragma unroll
  for (int chunk = 0; chunk < Tile::kChunks; ++chunk)
    tma_store(map.map, map.at(chunk * kRowTileBoxCols, row, h, b),
              const_cast<Tile&>(tile).chunk(chunk) + tile_row * kRowTileBoxCols);
}

// The maps a sparse forward reads its operands through.
struct QkvTileMaps {
  RowTileMap q, k, v;
};

// The map of `x` for boxes of `box_rows` rows, or false (nothing written)
// when x's layout or dtype cannot be described, or the driver lacks the entry point.
bool make_row_tile_map(const TensorView& x, int box_rows, RowTileMap* out);

// The map of `matrices` dense (rows x row_bytes) byte matrices, one after
// another (the low-bit operands), for boxes of (box_rows x box_bytes) swizzled
// over box_bytes (64 or 128: ByteTile's layout); at(column byte, row, matrix, 0).
// Throws if the driver refuses it.
RowTileMap byte_tile_map(const void* data, int64_t matrices, int64_t rows, int64_t row_bytes, int box_rows,
                         int box_bytes);

}  // namespace slattn::cuda
