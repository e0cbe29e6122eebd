// Helpers shared by the C++ tests: seeded random data, host tensors in any
// dtype and layout (HND or NHD through strides), routing-plan storage, and
// comparisons that report the worst element.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "naive_reference.h"
#include "slattn/sla.h"

namespace slattn_test {

using slattn::DType;

// ---- random data (fixed seeds: every run sees the same numbers) ----

inline std::vector<double> random_normal(int64_t count, uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<double> values(static_cast<size_t>(count));
  for (double& value : values) value = normal(engine);
  return values;
}

// ---- 16-bit floats, converted here independently of src/cpu/scalar.h ----

// Significant bits (the implicit leading one included) and the exponent of
// the smallest normal number of the 16-bit formats.
constexpr int kBfloat16Bits = 8, kBfloat16MinExponent = -126;
constexpr int kFloat16Bits = 11, kFloat16MinExponent = -14, kFloat16Bias = 15;

// Rounds x to `bits` significant bits, ties to even; values below
// 2^min_exponent keep the absolute quantum of that binade (subnormals).
inline double round_significand(double x, int bits, int min_exponent) {
  if (x == 0.0 || !std::isfinite(x)) return x;
  int exponent;
  std::frexp(x, &exponent);  // |x| = f · 2^exponent, f in [0.5, 1)
  const double quantum = std::ldexp(1.0, std::max(exponent - 1, min_exponent) - (bits - 1));
  return std::nearbyint(x / quantum) * quantum;
}

// bf16 is the upper half of an fp32 whose low 16 bits are zero.
inline uint16_t encode_bfloat16(double x) {
  const auto rounded = static_cast<float>(round_significand(x, kBfloat16Bits, kBfloat16MinExponent));  // exact
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

inline double decode_bfloat16(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// fp16: sign, 5 exponent bits (bias 15), 10 stored mantissa bits. Test data
// stays far below the fp16 maximum, so overflow is not handled.
inline uint16_t encode_float16(double x) {
  constexpr int kMantissaBits = kFloat16Bits - 1;
  if (std::isnan(x)) return 0x7E00;
  const double rounded = round_significand(x, kFloat16Bits, kFloat16MinExponent);
  const uint16_t sign = std::signbit(rounded) ? 0x8000 : 0;
  const double magnitude = std::fabs(rounded);
  if (magnitude == 0.0) return sign;
  int exponent;
  std::frexp(magnitude, &exponent);
  const int unbiased = exponent - 1;
  if (unbiased < kFloat16MinExponent) {  // subnormal: a count of the smallest quantum
    const auto units = static_cast<uint16_t>(std::ldexp(magnitude, kMantissaBits - kFloat16MinExponent));
    return static_cast<uint16_t>(sign | units);
  }
  const auto mantissa = static_cast<uint16_t>(std::ldexp(magnitude, kMantissaBits - unbiased) - (1 << kMantissaBits));
  return static_cast<uint16_t>(sign | ((unbiased + kFloat16Bias) << kMantissaBits) | mantissa);
}

inline double decode_float16(uint16_t half) {
  constexpr int kMantissaBits = kFloat16Bits - 1;
  const int exponent = (half >> kMantissaBits) & 0x1F;
  const int mantissa = half & ((1 << kMantissaBits) - 1);
  double magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, kFloat16MinExponent - kMantissaBits);
  } else {
    magnitude = std::ldexp(mantissa + (1 << kMantissaBits), exponent - kFloat16Bias - kMantissaBits);
  }
  return (half & 0x8000) ? -magnitude : magnitude;
}

// A flat buffer of `count` elements of `dtype`, read and written as doubles.
class Buffer {
 public:
  Buffer(DType dtype, int64_t count)
      : dtype_(dtype), count_(count), bytes_(static_cast<size_t>(count) * slattn::dtype_size(dtype)) {}
  Buffer(DType dtype, const std::vector<double>& values) : Buffer(dtype, static_cast<int64_t>(values.size())) {
    for (int64_t i = 0; i < count_; ++i) set(i, values[static_cast<size_t>(i)]);
  }

  void* data() { return bytes_.data(); }
  DType dtype() const { return dtype_; }
  int64_t count() const { return count_; }

  void set(int64_t i, double value) {
    unsigned char* at = bytes_.data() + static_cast<size_t>(i) * slattn::dtype_size(dtype_);
    switch (dtype_) {
      case DType::float64: return write(at, value);
      case DType::float32: return write(at, static_cast<float>(value));
      case DType::bfloat16: return write(at, encode_bfloat16(value));
      case DType::float16: return write(at, encode_float16(value));
    }
  }
  double get(int64_t i) const {
    const unsigned char* at = bytes_.data() + static_cast<size_t>(i) * slattn::dtype_size(dtype_);
    switch (dtype_) {
      case DType::float64: return read<double>(at);
      case DType::float32: return read<float>(at);
      case DType::bfloat16: return decode_bfloat16(read<uint16_t>(at));
      case DType::float16: return decode_float16(read<uint16_t>(at));
    }
    return std::numeric_limits<double>::quiet_NaN();
  }
  std::vector<double> values() const {
    std::vector<double> out(static_cast<size_t>(count_));
    for (int64_t i = 0; i < count_; ++i) out[static_cast<size_t>(i)] = get(i);
    return out;
  }

 private:
  // memcpy: the bytes hold no object of the element type to point at.
  template <typename T>
  static void write(unsigned char* at, T value) {
    std::memcpy(at, &value, sizeof(T));
  }
  template <typename T>
  static T read(const unsigned char* at) {
    T value;
    std::memcpy(&value, at, sizeof(T));
    return value;
  }

  DType dtype_;
  int64_t count_;
  std::vector<unsigned char> bytes_;  // operator new's alignment suffices for double
};

// The values as `dtype` stores them: what the library actually reads.
inline std::vector<double> round_to(DType dtype, const std::vector<double>& values) {
  return Buffer(dtype, values).values();
}

// ---- 4-D tensors in HND or NHD layout ----

enum class Layout { HND, NHD };
using Size4 = std::array<int64_t, 4>;  // logical (B, H, L, D)

// Element strides of the logical (B, H, L, D) order for a tensor stored as
// (B, H, L, D) (HND) or (B, L, H, D) (NHD).
inline Size4 strides_for(Layout layout, const Size4& size) {
  const int64_t heads = size[1], len = size[2], dim = size[3];
  if (layout == Layout::HND) return {heads * len * dim, len * dim, dim, 1};
  return {len * heads * dim, dim, heads * dim, 1};
}

class HostTensor {
 public:
  HostTensor(DType dtype, const Size4& size, Layout layout)
      : size_(size), stride_(strides_for(layout, size)), buffer_(dtype, size[0] * size[1] * size[2] * size[3]) {}
  // From dense logical-order values.
  HostTensor(const std::vector<double>& logical, DType dtype, const Size4& size, Layout layout)
      : HostTensor(dtype, size, layout) {
    for_each_element([&](int64_t logical_index, int64_t offset) { buffer_.set(offset, logical[logical_index]); });
  }

  slattn::TensorView view() {
    slattn::TensorView view;
    view.data = buffer_.data();
    view.dtype = buffer_.dtype();
    view.size = size_;
    view.stride = stride_;
    return view;
  }
  // The contents in dense logical order.
  std::vector<double> values() const {
    std::vector<double> logical(static_cast<size_t>(buffer_.count()));
    for_each_element([&](int64_t logical_index, int64_t offset) { logical[logical_index] = buffer_.get(offset); });
    return logical;
  }

 private:
  template <typename Visit>
  void for_each_element(Visit visit) const {
    int64_t logical_index = 0;
    for (int64_t b = 0; b < size_[0]; ++b)
      for (int64_t h = 0; h < size_[1]; ++h)
        for (int64_t l = 0; l < size_[2]; ++l)
          for (int64_t d = 0; d < size_[3]; ++d)
            visit(logical_index++, b * stride_[0] + h * stride_[1] + l * stride_[2] + d * stride_[3]);
  }

  Size4 size_, stride_;
  Buffer buffer_;
};

inline Size4 q_size(const Problem& p) { return {p.batch, p.q_heads, p.q_len, p.dim}; }
inline Size4 kv_size(const Problem& p) { return {p.batch, p.kv_heads, p.k_len, p.dim}; }

inline slattn::PlanShape plan_shape(const Problem& p) {
  slattn::PlanShape shape;
  shape.batch = p.batch;
  shape.heads = p.q_heads;
  shape.q_len = p.q_len;
  shape.k_len = p.k_len;
  shape.block_q = p.block_q;
  shape.block_k = p.block_k;
  return shape;
}

// Owns the buffers of a routing plan.
struct PlanStorage {
  slattn::PlanShape shape;
  std::vector<int8_t> block_map;
  std::vector<int32_t> row_count, row_index, col_count, col_index;

  explicit PlanStorage(const slattn::PlanShape& plan_shape)
      : shape(plan_shape),
        block_map(static_cast<size_t>(shape.rows() * shape.k_blocks()), 0),
        row_count(static_cast<size_t>(shape.rows()), 0),
        row_index(static_cast<size_t>(shape.rows() * shape.k_blocks()), 0),
        col_count(static_cast<size_t>(shape.cols()), 0),
        col_index(static_cast<size_t>(shape.cols() * shape.q_blocks()), 0) {}

  slattn::RoutingPlanView view() {
    return {shape, block_map.data(), row_count.data(), row_index.data(), col_count.data(), col_index.data()};
  }
};

// Routes q and k with the library's pooled router.
inline PlanStorage route_plan(const Problem& p, const slattn::TensorView& q, const slattn::TensorView& k) {
  PlanStorage plan(plan_shape(p));
  slattn::route({q, k, p.topk, p.negligible}, plan.view());
  return plan;
}

// A hedgehog weight: the identity it starts from, moved by noise so that a
// transposed or misplaced W shows, rounded to what `dtype` stores.
inline std::vector<double> random_feature_weight(int64_t dim, uint64_t seed, DType dtype) {
  std::vector<double> weight = random_normal(dim * dim, seed, 0.3);
  for (int64_t d = 0; d < dim; ++d) weight[static_cast<size_t>(d * dim + d)] += 1.0;
  return round_to(dtype, weight);
}

// Random q, k, v (and a projection when asked) for `p`, rounded to what
// `dtype` (inputs) and `proj_dtype` (projection and hedgehog's W) store.
// Hedgehog problems get W_q, and W_k unless p.tie_feature_weights.
inline Inputs<double> random_inputs(const Problem& p, uint64_t seed, DType dtype, bool weight, bool bias,
                                    DType proj_dtype = DType::float32) {
  Inputs<double> in;
  in.q = round_to(dtype, random_normal(p.q_count(), seed));
  in.k = round_to(dtype, random_normal(p.kv_count(), seed + 1));
  in.v = round_to(dtype, random_normal(p.kv_count(), seed + 2));
  // Non-zero projection of moderate size, so that Ol visibly moves out.
  if (weight) in.proj_weight = round_to(proj_dtype, random_normal(p.dim * p.dim, seed + 3, 0.5));
  if (bias) in.proj_bias = round_to(proj_dtype, random_normal(p.dim, seed + 4, 0.5));
  if (p.feature_map == slattn::FeatureMap::hedgehog) {
    in.feature_weight_q = random_feature_weight(p.dim, seed + 5, proj_dtype);
    if (!p.tie_feature_weights) in.feature_weight_k = random_feature_weight(p.dim, seed + 6, proj_dtype);
  }
  return in;
}

// Hedgehog's W_q and W_k as the library reads them; tied inputs (no W_k)
// pass W_q's pointer twice, and problems without weights pass none.
struct FeatureWeightStorage {
  Buffer q, k;

  FeatureWeightStorage(const Inputs<double>& in, DType dtype)
      : q(dtype, in.feature_weight_q), k(dtype, in.feature_weight_k) {}

  slattn::FeatureWeights view() {
    if (q.count() == 0) return {};
    return {q.data(), k.count() == 0 ? q.data() : k.data(), q.dtype()};
  }
};

template <typename To, typename From>
std::vector<To> convert(const std::vector<From>& values) {
  return std::vector<To>(values.begin(), values.end());
}

template <typename T>
Inputs<T> convert_inputs(const Inputs<double>& in) {
  return {convert<T>(in.q),           convert<T>(in.k),           convert<T>(in.v),
          convert<T>(in.proj_weight), convert<T>(in.proj_bias),   convert<T>(in.feature_weight_q),
          convert<T>(in.feature_weight_k)};
}

// ---- comparisons ----

inline double max_abs(const std::vector<double>& values) {
  double peak = 0.0;
  for (const double value : values)
    if (std::isfinite(value)) peak = std::max(peak, std::fabs(value));
  return peak;
}

// Largest |actual - expected|; equal values (infinities included) count as 0
// and any other non-finite pair as +inf.
inline double max_abs_error(const std::vector<double>& actual, const std::vector<double>& expected, size_t* worst) {
  double largest = 0.0;
  if (worst) *worst = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double error = actual[i] == expected[i] ? 0.0 : std::fabs(actual[i] - expected[i]);
    const double counted = std::isnan(error) ? std::numeric_limits<double>::infinity() : error;
    if (counted <= largest) continue;
    largest = counted;
    if (worst) *worst = i;
  }
  return largest;
}

// Every element within relative_tolerance · max|expected| of the expected one.
inline ::testing::AssertionResult all_close(const std::vector<double>& actual, const std::vector<double>& expected,
                                            double relative_tolerance) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "sizes differ: " << actual.size() << " vs " << expected.size();
  size_t worst = 0;
  const double error = max_abs_error(actual, expected, &worst);
  const double tolerance = relative_tolerance * max_abs(expected);
  if (error <= tolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << error << " > tolerance " << tolerance << " at element "
                                       << worst << " (actual " << actual[worst] << ", expected " << expected[worst]
                                       << ")";
}

// STYLE.md rule 7: the error of `actual` against the float64 `reference` is at
// most twice that of the same math done in the input precision (`baseline`),
// plus rounding noise of noise_relative · max|reference|.
inline ::testing::AssertionResult within_baseline(const std::vector<double>& actual,
                                                  const std::vector<double>& baseline,
                                                  const std::vector<double>& reference, double noise_relative) {
  if (actual.size() != reference.size() || baseline.size() != reference.size())
    return ::testing::AssertionFailure() << "sizes differ";
  size_t worst = 0;
  const double error = max_abs_error(actual, reference, &worst);
  const double baseline_error = max_abs_error(baseline, reference, nullptr);
  const double bound = 2.0 * baseline_error + noise_relative * max_abs(reference);
  if (error <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << error << " > bound " << bound << " (baseline error "
                                       << baseline_error << ") at element " << worst << " (actual " << actual[worst]
                                       << ", reference " << reference[worst] << ")";
}

// Runs `call` and checks that it throws slattn::Error whose message names `argument`.
template <typename Call>
::testing::AssertionResult throws_naming(Call call, const std::string& argument) {
  try {
    call();
  } catch (const slattn::Error& error) {
    if (std::string(error.what()).find(argument) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message does not name '" << argument << "': " << error.what();
  } catch (const std::exception& error) {
    return ::testing::AssertionFailure() << "threw something other than slattn::Error: " << error.what();
  }
  return ::testing::AssertionFailure() << "did not throw (expected an error naming '" << argument << "')";
}

}  // namespace slattn_test
