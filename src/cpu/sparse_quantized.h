// The sparse branch with low-bit operands (SPEC section 6) on one (batch,
// head), as fake quantization in the compute type:
//   Q and K~ = K − mean(K) to INT8 with one step per block (max |x| / 127);
//   P = exp(x − row max) in [0, 1] to FP8 e4m3 at a fixed scale of 448;
//   V to FP8 e4m3 with one scale per channel (max |v_c| / 448);
//   the row sum of P and the LSE from P unrounded, Os = Σ P̂ V̂ / Σ P.
// The logits are integer dot products (exact in fp32: |Σ| <= 127² · 256 < 2^24)
// times the two steps, as an INT8 tensor core computes them. The row max is
// over all the row's critical keys (a kernel's running max differs from it by
// at most the rounding of P).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/quantize.h"
#include "cpu/sparse_branch.h"

namespace slattn::cpu {

// x as INT8 multiples of one step per block of `block` rows: the integers, and the step of each block.
template <typename T>
struct BlockInt8 {
  Matrix<T> integers;
  std::vector<T> steps;

  static BlockInt8 of(const Matrix<T>& x, int64_t block) {
    BlockInt8 result{Matrix<T>(x.rows, x.cols), {}};
    for (int64_t first = 0; first < x.rows; first += block) {
      const int64_t end = std::min(x.rows, first + block);
      const T step = int8_step(x.row(first), x.row(first) + (end - first) * x.cols);
      result.steps.push_back(step);
      for (int64_t i = first; i < end; ++i)
        for (int64_t d = 0; d < x.cols; ++d) result.integers.row(i)[d] = round_to_int8(x.row(i)[d], step);
    }
    return result;
  }
};

// K − the mean of its rows (SPEC section 6: smoothing leaves the softmax unchanged).
template <typename T>
Matrix<T> smoothed_keys(const Matrix<T>& k) {
  std::vector<T> mean(static_cast<size_t>(k.cols), T(0));
  for (int64_t j = 0; j < k.rows; ++j) axpy(T(1), k.row(j), mean.data(), k.cols);
  for (auto& m : mean) m /= static_cast<T>(k.rows);
  Matrix<T> smoothed = k;
  for (int64_t j = 0; j < k.rows; ++j) axpy(T(-1), mean.data(), smoothed.row(j), k.cols);
  return smoothed;
}

// V as e4m3 values of one scale per channel (max |v_c| / 448): the values, and the scales.
template <typename T>
struct ChannelE4m3 {
  Matrix<T> values;
  std::vector<T> scales;

  static ChannelE4m3 of(const Matrix<T>& v) {
    ChannelE4m3 result{Matrix<T>(v.rows, v.cols), std::vector<T>(static_cast<size_t>(v.cols), T(0))};
    for (int64_t j = 0; j < v.rows; ++j)
      for (int64_t c = 0; c < v.cols; ++c) result.scales[c] = std::max(result.scales[c], std::fabs(v.row(j)[c]));
    for (auto& s : result.scales) s /= T(kE4m3Max);
    for (int64_t j = 0; j < v.rows; ++j)
      for (int64_t c = 0; c < v.cols; ++c) {
        const T s = result.scales[c];
        result.values.row(j)[c] = s == T(0) ? T(0) : round_to_e4m3(v.row(j)[c] / s);
      }
    return result;
  }
};

// As sparse_forward (sparse_branch.h), with the operands and P in low bits.
template <typename T>
void sparse_forward_quantized(const HeadPlan& plan, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                              T scale, Matrix<T>& os, std::vector<T>& lse) {
  const int64_t dim = q.cols;
  const auto q8 = BlockInt8<T>::of(q, plan.shape.block_q);
  const auto k8 = BlockInt8<T>::of(smoothed_keys(k), plan.shape.block_k);
  const auto v8 = ChannelE4m3<T>::of(v);
  std::vector<T> accumulated(static_cast<size_t>(dim));
  for_each_query_row(plan, k8.integers, v8.values, os, lse,
                     [&](int64_t i, int64_t m, const CriticalKeys<T>& keys, T* logits, T* out) {
                       keys.logits(q8.integers.row(i), T(1), logits);
                       for (int64_t t = 0; t < keys.count(); ++t)
                         logits[t] *= scale * q8.steps[m] * k8.steps[keys.index[t] / plan.shape.block_k];
                       const T peak = *std::max_element(logits, logits + keys.count());
                       T total = 0;
                       std::fill(accumulated.begin(), accumulated.end(), T(0));
                       for (int64_t t = 0; t < keys.count(); ++t) {
                         const T p = std::exp(logits[t] - peak);
                         total += p;
                         axpy(round_to_e4m3(p * T(kE4m3Max)) / T(kE4m3Max), keys.v.row(t), accumulated.data(), dim);
                       }
                       for (int64_t c = 0; c < dim; ++c) out[c] = accumulated[c] * v8.scales[c] / total;
                       return peak + std::log(total);
                     });
}

}  // namespace slattn::cpu
