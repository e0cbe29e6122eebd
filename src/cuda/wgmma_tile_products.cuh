// Steps of the warp-specialised Hopper forwards: a row tile copied by the
// tile copy engine (both forwards), and the sparse forward's products and its
// consumer warpgroup's pass over an item's key tiles.
#pragma once

#include <type_traits>

#include "cuda/key_tile_pipeline.cuh"
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

// A consumer warpgroup's pass over the key tiles t0 .. t0 + total - 1 of an
// item, with FlashAttention-3's overlap within a warpgroup: S of tile t and
// O += P V of tile t - 1 are issued together; on_scores(t), which hands the
// stage's K back and makes S ready to be P, runs while the second product is
// in flight; after_values() runs once O holds tile t - 1's values. The first
// tile's scores and the last tile's values are issued on their own, so that
// the loop body has one shape. The query tile is handed back after the last
// scores. `score` and `p` (P of the
// previous tile) are the caller's registers.
template <typename Element, int kStages, typename QTile, typename KeyTile, int kKeyTiles8, int kDimTiles8,
          typename OnScores, typename AfterValues>
__device__ __forceinline__ void overlap_key_tiles(KeyTilePipeline<kStages>& pipe, int32_t t0, int32_t total,
                                                  const QTile& q, const KeyTile (&k)[kStages],
                                                  const KeyTile (&v)[kStages], int row0,
                                                  float (&score)[kKeyTiles8][4], uint32_t (&p)[kKeyTiles8 / 2][4],
                                                  float (&out)[kDimTiles8][4], OnScores&& on_scores,
                                                  AfterValues&& after_values) {
  if (total > 0) {
    pipe.wait_keys(t0);
    wgmma_fence();
    issue_scores(score, q, k[pipe.stage(t0)], row0);
    wgmma_wait<0>();
    on_scores(t0);
    accumulators_to_fragments<Element, kKeyTiles8 * 8>(score, p);
  }
  for (int32_t t = t0 + 1; t < t0 + total; ++t) {
    pipe.wait_keys(t);
    wgmma_fence();
    issue_scores(score, q, k[pipe.stage(t)], row0);
    pipe.wait_values(t - 1);
    issue_values(out, p, v[pipe.stage(t - 1)]);
    wgmma_wait<1>();
    on_scores(t);
    wgmma_wait<0>();
    fence_accumulators(out);
    pipe.release_values(t - 1);
    after_values();
    accumulators_to_fragments<Element, kKeyTiles8 * 8>(score, p);
  }
  pipe.q_empty.arrive();  // every product that reads the query tile is complete
  if (total > 0) {
    const int32_t last = t0 + total - 1;
    pipe.wait_values(last);
    wgmma_fence();
    issue_values(out, p, v[pipe.stage(last)]);
    wgmma_wait<0>();
    fence_accumulators(out);
    pipe.release_values(last);
  }
}

}  // namespace slattn::cuda
