// One warp's products of fp32 matrices staged in shared memory (or held in
// its accumulators), on tf32 tensor cores (mma.sync m16n8k8, sm_80+): the
// linear branch's state products, where fp32 operands keep the precision of
// the per-block states and the FLOPs are few next to the sparse branch's.
// Operands are rounded to tf32 to nearest: the tensor cores would otherwise
// truncate the raw fp32 bits, a bias that sums over rows (dW = Σ dOᵀ Ol)
// would accumulate.
#pragma once

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace slattn::cuda {

// A shared matrix of fp32 (or of bf16/fp16, which tf32 holds exactly) with
// compile-time strides: element (r, c) at data[r * kRow + c * kCol]. Either
// stride may be 1, so one helper reads both stored layouts of an operand.
template <typename T, int kRow, int kCol>
struct SharedMatrix {
  const T* data;

  __device__ __forceinline__ uint32_t operator()(int r, int c) const {
    const T x = data[r * kRow + c * kCol];
    if constexpr (std::is_same_v<T, float>) return to_tf32(x);
    return __float_as_uint(to_float(x));  // bf16 and fp16 are exact in tf32
  }
};

// acc (16 x kN) += A (16 x kK) · B (kK x kN). Fragments as in mma.cuh: lane
// 4g + c reads A (g, k + c), (g + 8, k + c), (g, k + c + 4), (g + 8, k + c + 4)
// and B (k + c, n + g), (k + c + 4, n + g) at each step k of 8; choose row
// paddings that put these 32 addresses on distinct banks.
template <int kK, int kN, typename A, typename B>
__device__ __forceinline__ void mma_tf32(float (&acc)[kN / 8][4], A a, B b) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
#pragma unroll 4
  for (int k = 0; k < kK; k += 8) {
    const uint32_t af[4] = {a(g, k + c), a(g + 8, k + c), a(g, k + c + 4), a(g + 8, k + c + 4)};
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) mma_1688_tf32(acc[j], af, b(k + c, j * 8 + g), b(k + c + 4, j * 8 + g));
  }
}

// The tf32 A fragment of columns 8j..8j+7 of a warp's 16-row matrix held as
// fp32 accumulators (acc_tile = its tile j): lane 4g + c needs columns c and
// c + 4, which lanes 4g + c/2 and 4g + c/2 + 2 hold, at the parity of c.
__device__ __forceinline__ void accumulator_to_a(const float (&acc_tile)[4], uint32_t (&a)[4]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  const int low = 4 * g + c / 2, high = low + 2;
  const bool odd = c & 1;
  float low_of[4], high_of[4];  // the two source lanes' accumulators: rows g, g + 8, at both parities
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    low_of[e] = __shfl_sync(0xffffffffu, acc_tile[e], low);
    high_of[e] = __shfl_sync(0xffffffffu, acc_tile[e], high);
  }
  a[0] = to_tf32(odd ? low_of[1] : low_of[0]);    // (g, c)
  a[1] = to_tf32(odd ? low_of[3] : low_of[2]);    // (g + 8, c)
  a[2] = to_tf32(odd ? high_of[1] : high_of[0]);  // (g, c + 4)
  a[3] = to_tf32(odd ? high_of[3] : high_of[2]);  // (g + 8, c + 4)
}

// acc (16 x kN) += A (16 x kK) · B (kK x kN), A held as this warp's accumulators.
template <int kK, int kN, typename B>
__device__ __forceinline__ void mma_tf32_from_accumulators(float (&acc)[kN / 8][4], const float (&a_acc)[kK / 8][4],
                                                           B b) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int step = 0; step < kK / 8; ++step) {
    uint32_t af[4];
    accumulator_to_a(a_acc[step], af);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j)
      mma_1688_tf32(acc[j], af, b(8 * step + c, j * 8 + g), b(8 * step + c + 4, j * 8 + g));
  }
}

}  // namespace slattn::cuda
