// Warp-per-row building blocks: a row of up to kMaxHeadDim values is spread
// over the 32 lanes of a warp, lane l holding elements l, l + 32, ...
#pragma once

#include "cuda/common.cuh"
#include "slattn/options.h"
#include "slattn/sla.h"

namespace slattn::cuda {

inline constexpr int kMaxPerLane = static_cast<int>(kMaxHeadDim) / kWarpSize;

struct WarpRow {
  float v[kMaxPerLane];

  __device__ __forceinline__ static int index(int t) { return static_cast<int>(threadIdx.x % kWarpSize) + t * kWarpSize; }

  __device__ __forceinline__ void load(const float* row, int64_t width) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) v[t] = index(t) < width ? row[index(t)] : 0.0f;
  }
  template <typename Element>
  __device__ __forceinline__ void load(const DeviceView<const Element>& x, int64_t b, int64_t h, int64_t l,
                                       int64_t width) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) v[t] = index(t) < width ? x.load(b, h, l, index(t)) : 0.0f;
  }
  __device__ __forceinline__ void store(float* row, int64_t width) const {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t)
      if (index(t) < width) row[index(t)] = v[t];
  }
  __device__ __forceinline__ float dot(const WarpRow& other) const {
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) sum += v[t] * other.v[t];
    return warp_sum(sum);
  }
};

// φ over one row of `width` values (SPEC section 3).
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
    total = warp_sum(total);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) phi.v[t] /= total;
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

// dx for dφ at x, where phi = φ(x) (SPEC section 5).
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

}  // namespace slattn::cuda
