// The linear branch and the projection in the Hopper sparse forward's
// epilogue (ForwardLinearTerms, sparse_kernels.h), per query block and
// consumer warpgroup (64 rows): φ(Q) formed in place in the query tile with
// the rows' denominators φ(q)·Z_m + ε (while the block's last P V runs, Z_m
// copied with Q), Os staged in the output tile (and stored to out_sparse),
// Ol Wᵀ = φ(Q) (H_m Wᵀ) / den, and out = Os + Ol Wᵀ + b formed over the
// staged Os and stored by the copy engine. The producer copies H_m Wᵀ into
// one more ring stage per query block (produce_items' tail). Os is rounded to
// the input dtype before the sum, as the separate linear kernel reads it
// (linear_forward_wgmma.cu).
#pragma once

#include "cuda/feature_tiles.cuh"
#include "cuda/forward_output_copies.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/linear_set_products.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/tensor_map.h"

namespace slattn::cuda {

// ForwardLinearTerms as the kernel reads them.
struct ForwardLinearKernelArgs {
  RowTileMap set_h;       // H_m Wᵀ as (1, q pairs * Mq, F, D): boxes of whole states
  RowTileMap out;         // boxes of a warpgroup's rows
  RowTileMap out_sparse;  // likewise, when store_sparse
  bool store_sparse;
  FeatureMap feature_map;
  const float* set_z;
  const float* bias;
};

// φ of the warpgroup's rows [row0, row0 + 64) of the query tile, in place, two
// threads a row, and den[row] = φ(q)·Z_m + ε with φ in fp32 (as
// query_features_kernel); z_m: the block's Z_m in shared memory.
template <int kHeadDim, typename QTile>
__device__ __forceinline__ void queries_to_features(QTile& q, int row0, int warpgroup_thread, FeatureMap feature_map,
                                                    const float* z_m, float* den) {
  constexpr int kLanesPerRow = 2;
  using Row = FeatureTileRow<kLanesPerRow, kHeadDim / 8 / kLanesPerRow>;
  static_assert(kWarpgroupThreads == kLanesPerRow * kWarpgroupRows, "one pass over the warpgroup's rows");
  const int row = row0 + warpgroup_thread / kLanesPerRow, first = Row::first_unit(warpgroup_thread);
  float x[Row::kValues];
  Row::load(q, row, first, x);
  Row::apply(feature_map, x);
  Row::store(q, row, first, x, true);
  const auto* z = reinterpret_cast<const float4*>(z_m + first * 8);
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < Row::kValues / 4; ++i) {
    const float4 zi = z[i];
    dot += x[4 * i] * zi.x + x[4 * i + 1] * zi.y + x[4 * i + 2] * zi.z + x[4 * i + 3] * zi.w;
  }
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  if (warpgroup_thread % kLanesPerRow == 0) den[row] = dot + static_cast<float>(kLinearEpsilon);
}

// acc / den on the thread's rows (tile rows tile_row and tile_row + 8 of the block).
template <int kDimTiles8>
__device__ __forceinline__ void divide_by_denominators(float (&acc)[kDimTiles8][4], const float* den, int tile_row) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float inverse = 1.0f / den[tile_row + 8 * r];
#pragma unroll
    for (int j = 0; j < kDimTiles8; ++j) {
      acc[j][2 * r] *= inverse;
      acc[j][2 * r + 1] *= inverse;
    }
  }
}

// The staged Os rows of the thread (tile rows tile_row, tile_row + 8) become Os + projected + b, in place
// (bias: b in shared memory).
template <typename Element, int kDimTiles8, typename Tile>
__device__ __forceinline__ void add_projection(Tile& tile, int tile_row, const float (&projected)[kDimTiles8][4],
                                               const float* bias) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < kDimTiles8; ++j) {
    const int d = j * 8 + 2 * quad;
    const float2 b = *reinterpret_cast<const float2*>(bias + d);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      uint32_t& pair = tile.accumulator_pair(tile_row + 8 * r, j);
      const float2 os = unpack2<Element>(pair);
      pair = pack2<Element>(os.x + projected[j][2 * r] + b.x, os.y + projected[j][2 * r + 1] + b.y);
    }
  }
}

// A consumer warpgroup's end of query block `at` (every thread of the
// warpgroup calls it), whose key tiles took ring positions t0 .. t0 + total - 1
// and whose tail stage is t0 + total: issue_last_values() issues the block's
// last P V (when total > 0), φ(Q) and den are formed while it runs, Os is
// staged (LSE written) and stored to out_sparse, then φ(Q) (H_m Wᵀ) is
// formed in `out` (free by then) and out = Os + Ol Wᵀ + b stored.
template <typename Element, int kHeadDim, int kBlockQ, typename Shared, typename IssueLastValues>
__device__ __forceinline__ void end_block_with_linear_terms(Shared& s, const Geometry& g, const SparseForwardArgs& a,
                                                            const ForwardLinearKernelArgs& linear, const QueryItem& at,
                                                            int32_t t0, int32_t total, int consumer_thread,
                                                            float (&out)[kHeadDim / 8][4], const float (&row_max)[2],
                                                            float (&row_sum)[2], IssueLastValues&& issue_last_values) {
  const int warpgroup = consumer_thread / kWarpgroupThreads, warpgroup_thread = consumer_thread % kWarpgroupThreads;
  const int warpgroup_row0 = warpgroup * kWarpgroupRows;
  const bool storing_thread = issues_warpgroup_stores(consumer_thread);
  const int warp_row = consumer_thread / kWarpSize * kRowsPerWarp;  // the warp's first row in the block
  const int tile_row = warp_row + threadIdx.x % kWarpSize / 4;       // the thread's first row in the block
  const int64_t pair = at.b * g.heads + at.h, block_row0 = at.m * kBlockQ;
  const int32_t tail = t0 + total;
  const auto form_features = [&] {  // the last S = Q Kᵀ of the warpgroup is complete
    queries_to_features<kHeadDim>(s.q, warpgroup_row0, warpgroup_thread, linear.feature_map, s.z_m, s.den);
    fence_shared_for_async_proxy();
  };
  // The issue and the wait in one branch: split over two, ptxas serialises every product of the kernel.
  if (total > 0) {
    issue_last_values();
    form_features();  // while P V runs
    wgmma_wait<0>();
    fence_accumulators(out);
    s.pipe.release_values(tail - 1);
  } else {
    form_features();
  }
  if (storing_thread) wait_bulk_groups<false>();  // the last block's store has read the output tile
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);  // and φ(Q) and den are written
  stage_forward_rows<Element, kHeadDim>(g, a, pair, block_row0 + warp_row, warp_row, out, row_max, row_sum, s.out);
  fence_shared_for_async_proxy();
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
  if (storing_thread && linear.store_sparse) {
    store_row_tile(linear.out_sparse, s.out, warpgroup_row0, block_row0 + warpgroup_row0, at.h, at.b);
    commit_bulk_group();
  }

#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.0f;
  s.pipe.wait_keys(tail);
  wgmma_fence();
  issue_rows_times<1, StateRead::as_stored>(out, s.q, s.k[s.pipe.stage(tail)], warpgroup_row0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_accumulators(out);
  s.pipe.release_keys(tail);
  s.pipe.q_empty.arrive();  // every product that reads Q is complete
  s.pipe.wait_values(tail);  // an empty tile: its barriers keep their phases with the ring's
  s.pipe.release_values(tail);
  divide_by_denominators(out, s.den, tile_row);  // Ol Wᵀ
  if (storing_thread && linear.store_sparse) wait_bulk_groups<false>();  // Os is read out of the tile
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
  add_projection<Element>(s.out, tile_row, out, s.bias);
  fence_shared_for_async_proxy();
  named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
  if (storing_thread) {
    store_row_tile(linear.out, s.out, warpgroup_row0, block_row0 + warpgroup_row0, at.h, at.b);
    commit_bulk_group();
  }
}

}  // namespace slattn::cuda
