// The Hopper forwards' output through the copy engine: each warpgroup writes
// its normalised rows of Os into a shared tile (SwizzledTile), which the copy
// engine stores while the next query block's products run. With plain stores
// every thread block's rows would leave at once, between two blocks'
// products, and wait on memory together (the 16-bit forward took 0.568
// against 0.533 ms so on an H100 at the Wan2.1-1.3B shape).
#pragma once

#include "cuda/key_tile_pipeline.cuh"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/tensor_map.h"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {

// The map of the forward's one 16-bit destination (out or out_sparse) for
// boxes of a warpgroup's rows, or false when the rows go out as plain stores:
// two destinations, fp32 rows asked for, or a layout no map describes.
inline bool forward_output_map(const SparseForwardArgs& args, RowTileMap* map) {
  const bool one_destination = args.os_rows == nullptr && args.out.defined() != args.out_sparse.defined();
  return one_destination && make_row_tile_map(args.out.defined() ? args.out : args.out_sparse, kWarpgroupRows, map);
}

// The warp's rows of Os (from `warp_row0` of the sequence, `tile_row0` of
// `tile`), normalised and rounded into the tile; the LSE written
// (finish_forward_rows). Rows past the sequence are staged too: the store leaves them out.
template <typename Element, int kHeadDim, typename Tile>
__device__ __forceinline__ void stage_forward_rows(const Geometry& g, const SparseForwardArgs& a, int64_t pair,
                                                   int64_t warp_row0, int tile_row0,
                                                   const float (&out)[kHeadDim / 8][4], const float (&row_max)[2],
                                                   float (&row_sum)[2], Tile& tile) {
  const int group = threadIdx.x % kWarpSize / 4;
  float inverse[2];
  finish_forward_rows(g, a, pair, warp_row0, row_max, row_sum, inverse);
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
      tile.accumulator_pair(tile_row0 + group + 8 * r, j) =
          pack2<Element>(out[j][2 * r] * inverse[r], out[j][2 * r + 1] * inverse[r]);
}

// The consumer thread that issues its warpgroup's stores: the first.
__device__ __forceinline__ bool issues_warpgroup_stores(int consumer_thread) {
  return consumer_thread % kWarpgroupThreads == 0;
}

// A consumer warpgroup's epilogue for query block `at` (every thread of the
// warpgroup calls it): the rows staged in `tile` once the warpgroup's
// previous store has read them, then one store of the warpgroup's rows,
// issued by its first thread (issues_warpgroup_stores); drain_forward_stores before
// the thread block ends.
template <typename Element, int kHeadDim, int kBlockQ, typename Tile>
__device__ __forceinline__ void store_forward_rows_by_copies(const Geometry& g, const SparseForwardArgs& a,
                                                             const RowTileMap& map, const QueryItem& at,
                                                             int consumer_thread, const float (&out)[kHeadDim / 8][4],
                                                             const float (&row_max)[2], float (&row_sum)[2],
                                                             Tile& tile) {
  const int warpgroup = consumer_thread / kWarpgroupThreads, warpgroup_row0 = warpgroup * kWarpgroupRows;
  const bool storing_thread = issues_warpgroup_stores(consumer_thread);
  const int tile_row0 = consumer_thread / kWarpSize * kRowsPerWarp;  // the warp's first row in the block
  if (storing_thread) wait_bulk_groups<false>();
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
  stage_forward_rows<Element, kHeadDim>(g, a, at.b * g.heads + at.h, at.m * kBlockQ + tile_row0, tile_row0, out,
                                        row_max, row_sum, tile);
  fence_shared_for_async_proxy();
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
  if (storing_thread) {
    store_row_tile(map, tile, warpgroup_row0, at.m * kBlockQ + warpgroup_row0, at.h, at.b);
    commit_bulk_group();
  }
}

// The epilogue of a Hopper forward's consumer warpgroup for query block `at`:
// through the copy engine with `map` when `store_by_copies` (forward_output_map), else plain stores.
template <typename Element, int kHeadDim, int kBlockQ, typename Tile>
__device__ __forceinline__ void end_forward_block(const Geometry& g, const SparseForwardArgs& a, const RowTileMap& map,
                                                  bool store_by_copies, const QueryItem& at, int consumer_thread,
                                                  float (&out)[kHeadDim / 8][4], const float (&row_max)[2],
                                                  float (&row_sum)[2], Tile& tile) {
  if (store_by_copies) {
    store_forward_rows_by_copies<Element, kHeadDim, kBlockQ>(g, a, map, at, consumer_thread, out, row_max, row_sum,
                                                             tile);
  } else {
    const int64_t warp_row0 = at.m * kBlockQ + consumer_thread / kWarpSize * kRowsPerWarp;
    store_forward_rows<Element, kHeadDim>(g, a, at.b, at.h, warp_row0, out, row_max, row_sum);
  }
}

// Before a Hopper forward's thread block ends: its stores through the copy engine complete.
__device__ __forceinline__ void drain_forward_stores(bool store_by_copies, int consumer_thread) {
  if (store_by_copies && issues_warpgroup_stores(consumer_thread)) wait_bulk_groups<true>();
}

}  // namespace slattn::cuda
