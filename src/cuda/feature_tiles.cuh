// φ (SPEC section 3) of rows held in a swizzled shared tile (wgmma.cuh), as
// the Hopper kernels that form it from the tiles they copied do (the
// key-block states' φ(K_n), the sparse forward's φ(Q_m)): kLanesPerRow
// neighbouring threads take a row, kUnits 16-byte units (8 features) each,
// and φ runs on the values in registers, in fp32, the row's softmax
// reduced over those lanes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/wgmma.cuh"
#include "slattn/options.h"

namespace slattn::cuda {

template <int kLanesPerRow, int kUnits>
struct FeatureTileRow {
  static_assert(kLanesPerRow == 1 || kLanesPerRow == 2 || kLanesPerRow == 4, "a row's lanes in one quad");
  static constexpr int kValues = kUnits * 8;

  // The thread's first unit of its row.
  static __device__ __forceinline__ int first_unit(int thread) { return thread % kLanesPerRow * kUnits; }

  // The thread's units of row `row` of `tile`, from `first` on, as fp32.
  template <typename Tile>
  static __device__ __forceinline__ void load(const Tile& tile, int row, int first, float (&x)[kValues]) {
    using Element = std::remove_cv_t<std::remove_reference_t<decltype(tile.data[0])>>;
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const uint4 unit = *reinterpret_cast<const uint4*>(tile.unit(row, first + u));
      const uint32_t words[4] = {unit.x, unit.y, unit.z, unit.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 pair = unpack2<Element>(words[w]);
        x[8 * u + 2 * w] = pair.x;
        x[8 * u + 2 * w + 1] = pair.y;
      }
    }
  }

  // φ of the row in place; every lane of the row calls it (softmax reduces over them).
  static __device__ __forceinline__ void apply(FeatureMap feature_map, float (&x)[kValues]) {
    if (feature_map == FeatureMap::softmax) {
      float peak = x[0];
#pragma unroll
      for (int i = 1; i < kValues; ++i) peak = fmaxf(peak, x[i]);
#pragma unroll
      for (int lanes = 1; lanes < kLanesPerRow; lanes *= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, lanes));
      float total = 0.0f;
#pragma unroll
      for (int i = 0; i < kValues; ++i) {
        x[i] = __expf(x[i] - peak);
        total += x[i];
      }
#pragma unroll
      for (int lanes = 1; lanes < kLanesPerRow; lanes *= 2) total += __shfl_xor_sync(0xffffffffu, total, lanes);
      const float inverse = 1.0f / total;
#pragma unroll
      for (int i = 0; i < kValues; ++i) x[i] *= inverse;
    } else {
#pragma unroll
      for (int i = 0; i < kValues; ++i)
        x[i] = feature_map == FeatureMap::elu ? (x[i] > 0.0f ? x[i] + 1.0f : __expf(x[i])) : fmaxf(x[i], 0.0f);
    }
  }

  // Unit u of the values rounded to the tile's dtype (zero where not `live`).
  template <typename Element>
  static __device__ __forceinline__ uint4 packed_unit(const float (&x)[kValues], int u, bool live) {
    uint4 unit;
    unit.x = live ? pack2<Element>(x[8 * u], x[8 * u + 1]) : 0u;
    unit.y = live ? pack2<Element>(x[8 * u + 2], x[8 * u + 3]) : 0u;
    unit.z = live ? pack2<Element>(x[8 * u + 4], x[8 * u + 5]) : 0u;
    unit.w = live ? pack2<Element>(x[8 * u + 6], x[8 * u + 7]) : 0u;
    return unit;
  }

  // The values rounded back into row `row` of `tile` (zero where not `live`).
  template <typename Tile>
  static __device__ __forceinline__ void store(Tile& tile, int row, int first, const float (&x)[kValues], bool live) {
    using Element = std::remove_cv_t<std::remove_reference_t<decltype(tile.data[0])>>;
#pragma unroll
    for (int u = 0; u < kUnits; ++u)
      *reinterpret_cast<uint4*>(tile.unit(row, first + u)) = packed_unit<Element>(x, u, live);
  }
};

}  // namespace slattn::cuda
