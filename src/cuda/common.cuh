// Shared device helpers of the CUDA path: error checks, element conversions,
// strided addressing of TensorViews, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "slattn/error.h"
#include "slattn/tensor_view.h"

namespace slattn::cuda {

// Throws slattn::Unsupported with the CUDA error text; used after every API call and launch.
void check(cudaError_t status, const char* what);
#define SLATTN_CUDA_CHECK(call) ::slattn::cuda::check((call), #call)
#define SLATTN_LAUNCH_CHECK(name) ::slattn::cuda::check(cudaGetLastError(), name)

inline constexpr int kWarpSize = 32;

// kernel<<<grid, block, shared, stream>>>(args...), first raising the kernel's
// dynamic shared memory limit (48 KB by default) to `shared`.
template <typename... Params, typename... Args>
void launch_with_shared(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                        Args&&... args) {
  SLATTN_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  kernel<<<grid, block, shared, stream>>>(static_cast<Params>(args)...);
}

// The opt-in shared memory limit of a thread block on the current device.
inline size_t max_shared_per_block() {
  int device = 0, bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return static_cast<size_t>(bytes);
}

// Hopper's own instructions (wgmma, the tile copy engine, mbarrier waits,
// setmaxnreg) exist on sm_90a only: on other targets (and in the host pass)
// the helpers that wrap them are empty, and the kernels that call them are
// never launched there (loaded_for_hopper, sparse_mainloops.h).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SLATTN_SM90A(...) __VA_ARGS__
#else
#define SLATTN_SM90A(...)
#endif

// Streaming multiprocessors of the current device: the size of a persistent grid.
inline int multiprocessor_count() {
  int device = 0, count = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

// 2^x by the special-function unit alone (ex2.approx.ftz: relative error
// near 2^-22, results below 2^-126 flushed to zero), where exp2f adds range
// handling around it: the softmax of the sparse kernels takes one per score.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Element>
__device__ __forceinline__ float to_float(Element x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename Element>
__device__ __forceinline__ Element from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// A TensorView reduced to what kernels need: base pointer and element strides.
template <typename Element>
struct DeviceView {
  Element* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_l = 0, stride_d = 0;

  __host__ __device__ static DeviceView of(const TensorView& view) {
    DeviceView result;
    result.data = static_cast<Element*>(view.data);
    result.stride_b = view.stride[kBatch];
    result.stride_h = view.stride[kHeads];
    result.stride_l = view.stride[kLength];
    result.stride_d = view.stride[kHeadDim];
    return result;
  }
  __device__ __forceinline__ Element& at(int64_t b, int64_t h, int64_t l, int64_t d) const {
    return data[b * stride_b + h * stride_h + l * stride_l + d * stride_d];
  }
  __device__ __forceinline__ float load(int64_t b, int64_t h, int64_t l, int64_t d) const {
    return to_float(at(b, h, l, d));
  }
  __device__ __forceinline__ void store(int64_t b, int64_t h, int64_t l, int64_t d, float value) const {
    at(b, h, l, d) = from_float<Element>(value);
  }
  __host__ __device__ bool defined() const { return data != nullptr; }
};

// True when every row of x (b, h, l) is contiguous and starts on 16 bytes:
// rows may then be copied in 16-byte vectors.
template <typename Element>
__host__ __device__ __forceinline__ bool rows_are_16_byte_aligned(const DeviceView<Element>& x) {
  constexpr int kVector = 16 / sizeof(Element);
  return x.stride_d == 1 && x.stride_l % kVector == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0 &&
         x.stride_b % kVector == 0 && x.stride_h % kVector == 0;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace slattn::cuda
