// Scalar conversions between storage dtypes and the CPU compute type, and
// gathering one (batch, head) slice of a strided tensor into a dense buffer.
//
// bf16/fp16 inputs are upcast to fp32 for compute (SPEC section 4: fp32
// accumulation); fp32 and fp64 are computed in their own precision.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "slattn/error.h"
#include "slattn/tensor_view.h"

namespace slattn::cpu {

inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

inline uint16_t float_to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // keep it a NaN
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

inline float float16_to_float(uint16_t half) {
  const uint32_t sign = (half & 0x8000u) ? 1 : 0;
  const uint32_t exponent = (half >> 10) & 0x1F;
  const uint32_t mantissa = half & 0x3FF;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 0x1F) {
    magnitude = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  return sign ? -magnitude : magnitude;
}

inline uint16_t float_to_float16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000;
  const uint32_t magnitude = bits & 0x7FFFFFFF;
  if (magnitude >= 0x7F800000) return static_cast<uint16_t>(sign | 0x7C00 | (magnitude > 0x7F800000 ? 0x200 : 0));
  if (magnitude >= 0x477FF000) return static_cast<uint16_t>(sign | 0x7C00);  // >= 65520 rounds to inf
  if (magnitude < 0x38800000) {
    // Below the smallest normal half (2^-14): subnormal units of 2^-24, rounded
    // to nearest even by the current (default) rounding mode.
    const auto units = static_cast<uint32_t>(std::nearbyint(std::fabs(value) * 16777216.0f));
    return static_cast<uint16_t>(sign | units);
  }
  const uint32_t exponent = (magnitude >> 23) - 127 + 15;
  const uint32_t mantissa = magnitude & 0x7FFFFF;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t remainder = mantissa & 0x1FFF;
  if (remainder > 0x1000 || (remainder == 0x1000 && (half & 1))) ++half;  // may carry into the exponent
  return static_cast<uint16_t>(sign | half);
}

template <typename T>
inline T load_scalar(const void* base, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::float32: return static_cast<T>(static_cast<const float*>(base)[index]);
    case DType::float64: return static_cast<T>(static_cast<const double*>(base)[index]);
    case DType::bfloat16: return static_cast<T>(bfloat16_to_float(static_cast<const uint16_t*>(base)[index]));
    case DType::float16: return static_cast<T>(float16_to_float(static_cast<const uint16_t*>(base)[index]));
  }
  throw Error("unknown dtype code");
}

template <typename T>
inline void store_scalar(void* base, int64_t index, DType dtype, T value) {
  switch (dtype) {
    case DType::float32: static_cast<float*>(base)[index] = static_cast<float>(value); return;
    case DType::float64: static_cast<double*>(base)[index] = static_cast<double>(value); return;
    case DType::bfloat16: static_cast<uint16_t*>(base)[index] = float_to_bfloat16(static_cast<float>(value)); return;
    case DType::float16: static_cast<uint16_t*>(base)[index] = float_to_float16(static_cast<float>(value)); return;
  }
  throw Error("unknown dtype code");
}

template <typename T>
std::vector<T> load_vector(const void* base, int64_t count, DType dtype) {
  std::vector<T> values(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) values[i] = load_scalar<T>(base, i, dtype);
  return values;
}

// A dense (rows, cols) row-major matrix in the compute type.
template <typename T>
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<T> values;

  Matrix() = default;
  Matrix(int64_t rows_, int64_t cols_) : rows(rows_), cols(cols_), values(static_cast<size_t>(rows_ * cols_), T(0)) {}
  T* row(int64_t r) { return values.data() + r * cols; }
  const T* row(int64_t r) const { return values.data() + r * cols; }
};

// Copies the (L, D) slice at (b, h) of `view` into a dense matrix.
template <typename T>
Matrix<T> load_head(const TensorView& view, int64_t b, int64_t h) {
  Matrix<T> head(view.length(), view.head_dim());
  for (int64_t l = 0; l < head.rows; ++l) {
    T* dst = head.row(l);
    const int64_t base = view.offset(b, h, l, 0);
    for (int64_t d = 0; d < head.cols; ++d) dst[d] = load_scalar<T>(view.data, base + d * view.stride[kHeadDim], view.dtype);
  }
  return head;
}

// Writes a dense (L, D) matrix into the slice at (b, h) of `view`.
template <typename T>
void store_head(const Matrix<T>& head, const TensorView& view, int64_t b, int64_t h) {
  for (int64_t l = 0; l < head.rows; ++l) {
    const T* src = head.row(l);
    const int64_t base = view.offset(b, h, l, 0);
    for (int64_t d = 0; d < head.cols; ++d) store_scalar<T>(view.data, base + d * view.stride[kHeadDim], view.dtype, src[d]);
  }
}

// The simd reduction lets the compiler reassociate this one sum (and so
// vectorise it) without -ffast-math for the whole build.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += alpha * x
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace slattn::cpu
