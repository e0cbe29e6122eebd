// The number formats of the low-bit sparse branch (SPEC section 6), as fake
// quantization: values are rounded to what INT8 and FP8 e4m3 hold and kept in
// the compute type, so that the CPU path fixes the semantics the low-bit
// kernels are held to.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace slattn::cpu {

inline constexpr double kInt8Max = 127;
inline constexpr double kE4m3Max = 448;  // the largest finite e4m3 value (e4m3fn: no infinities)

// x rounded to the nearest INT8 step of `step` (ties to even), clamped to ±127 steps.
template <typename T>
T round_to_int8(T x, T step) {
  if (step == T(0)) return T(0);
  return std::clamp(std::nearbyint(x / step), T(-kInt8Max), T(kInt8Max));
}

// x rounded to the nearest FP8 e4m3 value (3 mantissa bits, exponent bias 7,
// subnormals from 2^-6 down in steps of 2^-9; ties to even), saturating at ±448.
template <typename T>
T round_to_e4m3(T x) {
  const T magnitude = std::fabs(x);
  if (!(magnitude > T(0))) return x;  // 0 and NaN as they are
  if (magnitude >= T(kE4m3Max)) return std::copysign(T(kE4m3Max), x);
  const int exponent = std::max(std::ilogb(magnitude), -6);  // below 2^-6, subnormal steps
  const T step = std::ldexp(T(1), exponent - 3);
  return std::copysign(std::nearbyint(magnitude / step) * step, x);
}

// The INT8 step of a block of values: max |x| / 127 (0 for an all-zero block).
template <typename T>
T int8_step(const T* begin, const T* end) {
  T peak = 0;
  for (const T* x = begin; x != end; ++x) peak = std::max(peak, std::fabs(*x));
  return peak / T(kInt8Max);
}

}  // namespace slattn::cpu
