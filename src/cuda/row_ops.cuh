// Warp-per-row building blocks: a row of up to kMaxHeadDim values is spread
// over the 32 lanes of a warp, lane l holding elements l, l + 32, ...
#pragma once

#include "cuda/common.cuh"
#include "slattn/options.h"
#include "slattn/sla.h"

namespace slattn::cuda {

inline constexpr int kMaxPerLane = static_cast<int>(kMaxHeadDim) / kWarpSize;

// Launch shape of the warp-per-row kernels.
inline constexpr int kRowThreads = 256;  // 8 warps, one row each
inline constexpr int kRowsPerBlock = kRowThreads / kWarpSize;

inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)); }

// The warp's row in a (pairs, rows_padded) grid of rows; false past the end.
struct RowIndex {
  int64_t pair, row;
  __device__ static bool of(int64_t pairs, int64_t rows_padded, RowIndex& out) {
    const int64_t flat = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarpSize;
    out = {flat / rows_padded, flat % rows_padded};
    return flat < pairs * rows_padded;
  }
};

struct WarpRow {
  float v[kMaxPerLane];

  __device__ __forceinline__ static int index(int t) {
    return static_cast<int>(threadIdx.x % kWarpSize) + t * kWarpSize;
  }

  template <typename T>  // fp32 rows, or bf16/fp16 rows of a shared tile
  __device__ __forceinline__ void load(const T* row, int64_t width) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) v[t] = index(t) < width ? to_float(row[index(t)]) : 0.0f;
  }
  template <typename Element>
  __device__ __forceinline__ void load(const DeviceView<const Element>& x, int64_t b, int64_t h, int64_t l,
                                       int64_t width) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) v[t] = index(t) < width ? x.load(b, h, l, index(t)) : 0.0f;
  }
  template <typename T>  // fp32 rows, or bf16/fp16 rows of a shared tile
  __device__ __forceinline__ void store(T* row, int64_t width) const {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t)
      if (index(t) < width) row[index(t)] = from_float<T>(v[t]);
  }
  __device__ __forceinline__ float dot(const WarpRow& other) const {
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) sum += v[t] * other.v[t];
    return warp_sum(sum);
  }
};

// A lane's share of a row when kDim / 8 lanes hold it, 8 consecutive values
// each (one 16-byte vector of 16-bit elements): for kernels whose rows are
// short work, where a warp per row leaves most lanes waiting on reductions
// and element-wide accesses. Rows of a thread index: row_of_thread().
template <int kDim>
struct RowSlice {
  static constexpr int kPerLane = 8, kLanes = kDim / kPerLane;
  static_assert(kWarpSize % kLanes == 0, "whole rows per warp");
  float v[kPerLane];

  static __device__ __forceinline__ int64_t row_of_thread() {
    return (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kLanes;
  }
  static __device__ __forceinline__ int first() { return (threadIdx.x % kLanes) * kPerLane; }
  // Thread blocks of `threads` for `rows` rows.
  static unsigned blocks(int64_t rows, int threads) { return static_cast<unsigned>(ceil_div(rows * kLanes, threads)); }

  template <typename Element>
  __device__ __forceinline__ void load(const DeviceView<const Element>& x, int64_t b, int64_t h, int64_t l) {
    const Element* source = &x.at(b, h, l, first());
    if (x.stride_d == 1 && reinterpret_cast<uintptr_t>(source) % 16 == 0) {
      const uint4 raw = *reinterpret_cast<const uint4*>(source);
      const auto* e = reinterpret_cast<const Element*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) v[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) v[i] = to_float(source[i * x.stride_d]);
    }
  }
  // Into a dense row of 16-bit elements or fp32 (16-byte aligned: vector stores).
  template <typename T>
  __device__ __forceinline__ void store(T* row) const {
    constexpr int kVector = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kPerLane; i += kVector) {
      uint4 raw;
      auto* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVector; ++j) e[j] = from_float<T>(v[i + j]);
      *reinterpret_cast<uint4*>(row + first() + i) = raw;
    }
  }
  // x combined over the lanes of the row.
  template <typename Op>
  static __device__ __forceinline__ float reduce(float x, Op&& op) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
  }
  __device__ __forceinline__ float dot(const RowSlice& other) const {
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) sum += v[i] * other.v[i];
    return reduce(sum, [](float a, float b) { return a + b; });
  }
};

// φ over one row of `width` values (SPEC section 3), for the fixed maps;
// hedgehog runs the softmax branch over its 2·D pre-activations (hedgehog.cu).
__device__ __forceinline__ WarpRow feature_map_row(FeatureMap feature_map, const WarpRow& x, int64_t width) {
  WarpRow phi;
  if (feature_map == FeatureMap::softmax) {
    float peak = -INFINITY;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t)
      if (WarpRow::index(t) < width) peak = fmaxf(peak, x.v[t]);
    peak = warp_max(peak);
    float total = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      phi.v[t] = WarpRow::index(t) < width ? __expf(x.v[t] - peak) : 0.0f;
      total += phi.v[t];
    }
    const float inverse = 1.0f / warp_sum(total);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) phi.v[t] *= inverse;
  } else {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const float value = x.v[t];
      phi.v[t] = WarpRow::index(t) >= width ? 0.0f
                 : feature_map == FeatureMap::elu ? (value > 0.0f ? value + 1.0f : __expf(value))
                                                  : fmaxf(value, 0.0f);
    }
  }
  return phi;
}

// dx for dφ at x, where phi = φ(x) (SPEC section 5), for the fixed maps.
__device__ __forceinline__ WarpRow feature_map_backward_row(FeatureMap feature_map, const WarpRow& x,
                                                            const WarpRow& phi, const WarpRow& dphi) {
  WarpRow dx;
  if (feature_map == FeatureMap::softmax) {
    const float inner = phi.dot(dphi);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) dx.v[t] = phi.v[t] * (dphi.v[t] - inner);
  } else {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const bool positive = x.v[t] > 0.0f;
      dx.v[t] = feature_map == FeatureMap::elu ? (positive ? dphi.v[t] : dphi.v[t] * __expf(x.v[t]))
                                               : (positive ? dphi.v[t] : 0.0f);
    }
  }
  return dx;
}

// Hedgehog's backward for one row (SPEC section 5), as far as pre = x Wᵀ:
// through the softmax over F = 2·dim, then the halves folded (the second holds
// −pre): d(pre) = d[:dim] − d[dim:]. `row` (F entries, dφ's row) receives
// d(pre) in its first dim entries; the products with W follow (hedgehog.cu).
// The fold goes through memory because the partner of slot t, dim entries on,
// is a register slot the compiler cannot index at run time.
__device__ __forceinline__ void hedgehog_pre_grad_row(const WarpRow& phi, const WarpRow& dphi, int64_t dim,
                                                      float* row) {
  const float inner = phi.dot(dphi);
  WarpRow both;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) both.v[t] = phi.v[t] * (dphi.v[t] - inner);
  both.store(row, 2 * dim);
  __syncwarp();  // the fold reads entries other lanes stored
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int i = WarpRow::index(t);
    if (i < dim) row[i] = both.v[t] - row[i + dim];  // entry i is this lane's alone
  }
}

}  // namespace slattn::cuda
