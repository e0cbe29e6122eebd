// The warpgroup products of the Hopper linear kernels (linear_forward_wgmma.cu,
// linear_backward_wgmma.cu): the warpgroup's 64 rows of a row tile (φ(Q),
// dO or dOl, read K-major) times a D x D state tile (h_n, H or W) read as
// stored, rows along K (MN-major, as V is in P V), or transposed (K-major);
// and a tile's columns times another's. Issued, not committed. StateSum: the elementwise sum of state tiles, for a
// walk that adds its tiles first and multiplies once.
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

// A sum of state tiles (StateTile, 16-bit elements) in fp32, spread over
// kThreads threads: `thread` holds the 16-byte units thread + i kThreads of
// the tile (consecutive threads, consecutive units: conflict-free reads of
// the swizzled rows).
template <typename StateTile, int kThreads>
struct StateSum {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<StateTile&>().data[0])>>;
  static constexpr int kUnitsPerRow = StateTile::kChunks * StateTile::kChunkCols / StateTile::kUnitElements;
  static constexpr int kUnits = StateTile::kUnits / kThreads;
  static_assert(kUnits * kThreads == StateTile::kUnits, "whole units per thread");
  float v[kUnits][8] = {};

  // += sign · tile.
  __device__ __forceinline__ void add(const StateTile& tile, float sign, int thread) {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int unit = thread + i * kThreads;
      const uint4 bits = *reinterpret_cast<const uint4*>(tile.unit(unit / kUnitsPerRow, unit % kUnitsPerRow));
      const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 pair = unpack2<Element>(words[w]);
        v[i][2 * w] += sign * pair.x;
        v[i][2 * w + 1] += sign * pair.y;
      }
    }
  }

  // += sign · the tiles of ring positions [t, t + count) of a KeyTilePipeline's stages (on their "keys"
  // barriers alone: the producer copies with NoValues), each handed back once read; returns t + count.
  template <typename Pipe>
  __device__ __forceinline__ int32_t add_stages(Pipe& pipe, const StateTile* stages, int32_t t, int32_t count,
                                                float sign, int thread) {
    for (const int32_t end = t + count; t < end; ++t) {
      pipe.wait_keys(t);
      add(stages[pipe.stage(t)], sign, thread);
      pipe.release_keys(t);
    }
    return t;
  }

  // The sum rounded into `tile`, the B of the consumers' products: written once all kThreads of them
  // (named barrier `barrier`) are done reading it and with their earlier products, visible to the tensor
  // cores of every consumer on return.
  __device__ __forceinline__ void publish(StateTile& tile, int barrier, int thread) const {
    named_barrier_sync(barrier, kThreads);
    store(tile, thread);
    fence_shared_for_tensor_cores();
    named_barrier_sync(barrier, kThreads);
  }

 private:
  // The sum rounded to Element into `tile`, at the places add() reads.
  __device__ __forceinline__ void store(StateTile& tile, int thread) const {
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int unit = thread + i * kThreads;
      *reinterpret_cast<uint4*>(tile.unit(unit / kUnitsPerRow, unit % kUnitsPerRow)) =
          make_uint4(pack2<Element>(v[i][0], v[i][1]), pack2<Element>(v[i][2], v[i][3]),
                     pack2<Element>(v[i][4], v[i][5]), pack2<Element>(v[i][6], v[i][7]));
    }
  }
};

}  // namespace slattn::cuda
