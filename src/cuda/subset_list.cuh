// Sums of per-block linear-branch states over a subset of blocks (SPEC
// sections 3 and 5): H_m over the key blocks of U_m, dh_n over the query
// blocks whose U_m holds n. A thread block lists the blocks it needs, then
// sums them directly or subtracts the rest from the total, whichever list is
// shorter, so that no sum cancels most of a total.
#pragma once

#include "cuda/common.cuh"
#include "slattn/options.h"
#include "slattn/plan.h"

namespace slattn::cuda {

__device__ __forceinline__ bool in_linear_set(int8_t cls, LinearScope scope) {
  return scope == LinearScope::marginal ? cls == kMarginal : cls != kNegligible;
}

// Which rows a subset sum reads: the included rows (summed) when they are at
// most half of all, else the excluded ones (subtracted from the total), in
// ascending order. Built by the whole thread block: a count, then a scan of
// warp ballots chunk by chunk.
struct SubsetList {
  int32_t* rows;  // shared memory, room for `count` entries
  int32_t length;
  bool direct;
  int64_t included;
};

// Shared bytes of a list of `count` rows: the compiler reads the list four
// entries at a time (one 16-byte load), so it gets a slack of three.
inline size_t subset_list_bytes(int64_t count) { return (count + 3) * sizeof(int32_t); }

template <typename Include>
__device__ void build_subset_list(int64_t count, Include include, SubsetList& list) {
  __shared__ int32_t warp_counts[kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  __syncthreads();  // the previous list is no longer read
  int64_t included = 0;
  for (int64_t base = 0; base < count; base += blockDim.x)
    included += __syncthreads_count(base + threadIdx.x < count && include(base + threadIdx.x));
  const bool direct = included * 2 <= count;
  int32_t length = 0;
  for (int64_t base = 0; base < count; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool take = i < count && include(i) == direct;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int32_t offset = length + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warps; ++w) {
      if (w < warp) offset += warp_counts[w];
      length += warp_counts[w];
    }
    if (take) list.rows[offset] = static_cast<int32_t>(i);
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
  list.length = length;
  list.direct = direct;
  list.included = included;
}

// Σ_{i included} items[i * stride + e], through the list.
__device__ __forceinline__ float subset_sum(const SubsetList& list, const float* items, int64_t stride,
                                            const float* total, int64_t e) {
  if (list.included == 0) return 0.0f;
  float sum = list.direct ? 0.0f : total[e];
  const float sign = list.direct ? 1.0f : -1.0f;
  for (int32_t i = 0; i < list.length; ++i) sum += sign * items[list.rows[i] * stride + e];
  return sum;
}

// The subset sum of whole (kRows x kCols) fp32 matrices, items[i] at
// items + i * kRows * kCols and total likewise, into a shared matrix with rows
// `pitch` floats apart (added to what it holds when `accumulate`), by kThreads
// threads. Each thread holds up to 16 float4 sums in registers, so that all its
// loads of one list entry are in flight at once.
template <int kRows, int kCols, int kThreads>
__device__ void subset_sum_to_shared(const SubsetList& list, const float* items, const float* total, float* shared,
                                     int pitch, bool accumulate) {
  constexpr int kVectors = kRows * kCols / 4;
  constexpr int kPerThread = kVectors / kThreads < 16 ? kVectors / kThreads : 16;
  static_assert(kCols % 4 == 0 && kVectors % (kPerThread * kThreads) == 0, "whole float4 passes");
  const auto* items4 = reinterpret_cast<const float4*>(items);
  const auto* total4 = reinterpret_cast<const float4*>(total);
  const float sign = list.direct ? 1.0f : -1.0f;
  const bool from_total = list.included > 0 && !list.direct;
  const int32_t length = list.included > 0 ? list.length : 0;
  for (int base = threadIdx.x; base < kVectors; base += kPerThread * kThreads) {
    float4 sum[kPerThread];
#pragma unroll
    for (int p = 0; p < kPerThread; ++p)
      sum[p] = from_total ? total4[base + p * kThreads] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int32_t i = 0; i < length; ++i) {
      const float4* item = items4 + int64_t(list.rows[i]) * kVectors + base;
#pragma unroll
      for (int p = 0; p < kPerThread; ++p) {
        const float4 x = item[p * kThreads];
        sum[p].x += sign * x.x;
        sum[p].y += sign * x.y;
        sum[p].z += sign * x.z;
        sum[p].w += sign * x.w;
      }
    }
#pragma unroll
    for (int p = 0; p < kPerThread; ++p) {
      const int e = 4 * (base + p * kThreads);
      float* row = shared + (e / kCols) * pitch + e % kCols;
      row[0] = (accumulate ? row[0] : 0.0f) + sum[p].x;
      row[1] = (accumulate ? row[1] : 0.0f) + sum[p].y;
      row[2] = (accumulate ? row[2] : 0.0f) + sum[p].z;
      row[3] = (accumulate ? row[3] : 0.0f) + sum[p].w;
    }
  }
}

}  // namespace slattn::cuda
