// The number formats of the low-bit sparse branch (SPEC section 6) on the
// device, as the CPU path rounds them (src/cpu/quantize.h): INT8 to nearest,
// ties to even, clamped to ±127; e4m3 (pack4_e4m3, wgmma.cuh) to nearest
// even, saturating. Shared by the quantization passes (quantize_operands.cu)
// and the forward, which quantizes its own query rows.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace slattn::cuda {

inline constexpr float kInt8Max = 127.0f;
inline constexpr float kE4m3Max = 448.0f;  // the largest finite e4m3 value
inline constexpr int kQuantizeVector = 8;  // channels a thread reads at once: 16 bytes of bf16/fp16

// Channels d0 .. d0 + 7 of row l of x as fp32: one 16-byte load when rows are aligned (rows_are_16_byte_aligned).
template <typename Element>
__device__ __forceinline__ void load_vector(const DeviceView<const Element>& x, bool aligned, int64_t b, int64_t h,
                                            int64_t l, int d0, float (&out)[kQuantizeVector]) {
  if (aligned) {
    const uint4 raw = *reinterpret_cast<const uint4*>(&x.at(b, h, l, d0));
    const Element* elements = reinterpret_cast<const Element*>(&raw);
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) out[i] = to_float(elements[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kQuantizeVector; ++i) out[i] = x.load(b, h, l, d0 + i);
  }
}

// Eight values as INT8 multiples of `step` (0 when step is 0), packed low byte first.
__device__ __forceinline__ uint2 pack8_int8(const float (&x)[kQuantizeVector], float step) {
  uint32_t packed[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < kQuantizeVector; ++i) {
    const int integer = step > 0.0f ? max(-127, min(127, __float2int_rn(x[i] / step))) : 0;
    packed[i / 4] |= (static_cast<uint32_t>(integer) & 0xFFu) << (8 * (i % 4));
  }
  return make_uint2(packed[0], packed[1]);
}

// The largest `x` of the thread block's kThreads threads, given to every
// thread; `scratch` holds kThreads / 32 floats (two barriers; callable again).
template <int kThreads>
__device__ __forceinline__ float block_max(float x, float* scratch) {
  x = warp_max(x);
  __syncthreads();  // earlier readers of scratch are done
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  float peak = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / kWarpSize; ++w) peak = fmaxf(peak, scratch[w]);
  return peak;
}

}  // namespace slattn::cuda
