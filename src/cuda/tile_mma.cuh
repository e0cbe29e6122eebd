// The tile vocabulary of the sparse kernels (forward and backward): row-major
// (rows x kHeadDim) tiles of bf16/fp16 in shared memory, and the two products
// every FlashAttention-style step is made of, for one warp's 16 rows:
//   mma_a_bt: acc (16 x kCols) += A (16 x kHeadDim) · Bᵀ, A and B shared tiles;
//   mma_p_b:  acc (16 x kHeadDim) += P (16 x kRows) · B, P held as the fp32
//             accumulators of an earlier mma_a_bt, B a shared (kRows x kHeadDim) tile.
// The forward is S = Q Kᵀ then O += P V; the backward's dQ is S = Q Kᵀ,
// dP = dO Vᵀ, dQ += dS K; its dK/dV is Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, dV += Pᵀ dO,
// dK += dSᵀ Q.
#pragma once

#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "cuda/mma.cuh"
#include "slattn/plan.h"

namespace slattn::cuda {

inline constexpr int kRowsPerWarp = 16;  // the M of one mma
inline constexpr int kTilePad = 8;       // elements of padding per shared row: ldmatrix rows on distinct banks
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

template <typename Element, int kHeadDim>
using TileRow = Element[kHeadDim + kTilePad];

// Starts copying rows [first, first + rows) of the (b, h) slice of x into
// tile[0..rows), zero rows from `valid` on: asynchronous 16-byte copies when
// the head dim is contiguous and aligned, plain loads otherwise. The tile is
// complete for every thread after cp_async_wait (of its group) and a barrier.
template <typename Element, int kHeadDim, int kThreads>
__device__ void load_tile(const DeviceView<const Element>& x, int64_t b, int64_t h, int64_t first, int rows,
                          int64_t valid, TileRow<Element, kHeadDim>* tile) {
  constexpr int kVector = 16 / sizeof(Element);
  const bool vectorised = x.stride_d == 1 && x.stride_l % kVector == 0 &&
                          reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && (x.stride_b % kVector == 0) &&
                          (x.stride_h % kVector == 0);
  if (vectorised) {
    for (int i = threadIdx.x; i < rows * (kHeadDim / kVector); i += kThreads) {
      const int r = i / (kHeadDim / kVector), d = (i % (kHeadDim / kVector)) * kVector;
      const bool read = first + r < valid;
      cp_async<16>(&tile[r][d], read ? &x.at(b, h, first + r, d) : x.data, read ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < rows * kHeadDim; i += kThreads) {
      const int r = i / kHeadDim, d = i % kHeadDim;
      tile[r][d] = first + r < valid ? x.at(b, h, first + r, d) : from_float<Element>(0.0f);
    }
  }
}

// The tiles of kTileRows rows that cover the blocks of a sorted block list
// (a row list of key blocks, or a column list of query blocks): tile t lies in
// block list[t / per_block]. Only the sequence's last block can be partial,
// and only it can have fewer tiles; being the largest index, it comes last.
template <int kTileRows>
struct BlockTiles {
  const int32_t* list;
  int32_t blocks;
  int64_t block_size, length;

  __device__ int per_block() const { return static_cast<int>(block_size / kTileRows); }
  __device__ int32_t count() const {
    if (blocks == 0) return 0;
    const int64_t last = list[blocks - 1];
    const int64_t last_rows = min(length, (last + 1) * block_size) - last * block_size;
    return (blocks - 1) * per_block() + static_cast<int32_t>(ceil_div(last_rows, kTileRows));
  }
  __device__ int64_t first(int32_t t) const {
    return list[t / per_block()] * block_size + (t % per_block()) * int64_t(kTileRows);
  }
  __device__ int64_t end(int32_t t) const { return min(length, (list[t / per_block()] + 1) * block_size); }
};

// acc (16 x kCols) += a[0..16) · b[0..kCols)ᵀ over kHeadDim, a and b row-major shared tiles.
template <typename Element, int kHeadDim, int kCols>
__device__ __forceinline__ void mma_a_bt(float (&acc)[kCols / 8][4], const TileRow<Element, kHeadDim>* a,
                                         const TileRow<Element, kHeadDim>* b) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int step = 0; step < kHeadDim / 16; ++step) {
    uint32_t af[4];
    ldmatrix_x4(af, &a[lane % 16][step * 16 + (lane / 16) * 8]);
#pragma unroll
    for (int pair16 = 0; pair16 < kCols / 16; ++pair16) {
      uint32_t bf[4];
      ldmatrix_x4(bf, &b[pair16 * 16 + (lane & 7) + ((lane >> 4) << 3)][step * 16 + ((lane >> 3) & 1) * 8]);
      mma_16816<Element>(acc[2 * pair16], af, bf[0], bf[1]);
      mma_16816<Element>(acc[2 * pair16 + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x kHeadDim) += P · b[0..kRows): the accumulators of two adjacent
// 8-column tiles of P form one A fragment once rounded to Element.
template <typename Element, int kHeadDim, int kRows>
__device__ __forceinline__ void mma_p_b(float (&acc)[kHeadDim / 8][4], const float (&p)[kRows / 8][4],
                                        const TileRow<Element, kHeadDim>* b) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int step = 0; step < kRows / 16; ++step) {
    const uint32_t pf[4] = {pack2<Element>(p[2 * step][0], p[2 * step][1]),
                            pack2<Element>(p[2 * step][2], p[2 * step][3]),
                            pack2<Element>(p[2 * step + 1][0], p[2 * step + 1][1]),
                            pack2<Element>(p[2 * step + 1][2], p[2 * step + 1][3])};
#pragma unroll
    for (int d16 = 0; d16 < kHeadDim / 16; ++d16) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, &b[step * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)][d16 * 16 + (lane >> 4) * 8]);
      mma_16816<Element>(acc[2 * d16], pf, bf[0], bf[1]);
      mma_16816<Element>(acc[2 * d16 + 1], pf, bf[2], bf[3]);
    }
  }
}

// Accumulator elements 2p and 2p + 1 of a tile are adjacent columns of row
// accumulator_row(2p): global rows are read and written as float2 pairs.
template <typename F>  // float, or const float for a read-only pair
__device__ __forceinline__ auto& accumulator_pair(F* row_major, int pitch, int j, int p) {
  using Pair = std::conditional_t<std::is_const_v<F>, const float2, float2>;
  return *reinterpret_cast<Pair*>(row_major + accumulator_row(2 * p) * pitch + accumulator_col(j, 0));
}

// Columns d and d + 1 of row (b, h, l) of a tensor, as fp32.
template <typename Element>
__device__ __forceinline__ float2 load_pair(const DeviceView<Element>& view, int64_t b, int64_t h, int64_t l, int d) {
  const Element* at = &view.at(b, h, l, d);
  return make_float2(to_float(at[0]), to_float(at[view.stride_d]));
}

// x at column d and y at d + 1 of row (b, h, l) of a tensor: one 32-bit
// store when the head dim is contiguous (d is even: the address is aligned).
template <typename Element>
__device__ __forceinline__ void store_pair(const DeviceView<Element>& view, int64_t b, int64_t h, int64_t l, int d,
                                           float x, float y) {
  Element* at = &view.at(b, h, l, d);
  if (view.stride_d == 1 && reinterpret_cast<uintptr_t>(at) % 4 == 0) {
    *reinterpret_cast<uint32_t*>(at) = pack2<Element>(x, y);
  } else {
    at[0] = from_float<Element>(x);
    at[view.stride_d] = from_float<Element>(y);
  }
}

// out at the thread's accumulator rows `row` and row + 8 (rows from `end` on
// skipped) = acc, stored in out's dtype.
template <typename Element, int kTiles>
__device__ __forceinline__ void store_accumulator_rows(const DeviceView<Element>& out, int64_t b, int64_t h,
                                                       int64_t row, int64_t end, const float (&acc)[kTiles][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= end) continue;
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
      store_pair(out, b, h, row + 8 * r, j * 8 + 2 * int(threadIdx.x % 4), acc[j][2 * r], acc[j][2 * r + 1]);
  }
}

// out at the thread's accumulator rows `row` and row + 8 (rows from `end` on
// skipped) = acc + fp32 `rows` (pitch apart, at the thread's first row and
// column), stored in out's dtype: a branch's gradient rows plus another's.
// A row's pairs are all loaded before the first store: out might alias
// `rows` for all the compiler knows, and a load after each store would wait
// on global memory once per pair.
template <typename Element, int kTiles>
__device__ __forceinline__ void store_sum_with_rows(const DeviceView<Element>& out, int64_t b, int64_t h, int64_t row,
                                                    int64_t end, const float* rows, int pitch,
                                                    const float (&acc)[kTiles][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= end) continue;
    float2 from_rows[kTiles];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) from_rows[j] = *reinterpret_cast<const float2*>(rows + 8 * r * pitch + 8 * j);
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
      store_pair(out, b, h, row + 8 * r, j * 8 + 2 * int(threadIdx.x % 4), from_rows[j].x + acc[j][2 * r],
                 from_rows[j].y + acc[j][2 * r + 1]);
  }
}

}  // namespace slattn::cuda
