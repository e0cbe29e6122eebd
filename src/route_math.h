// The arithmetic of routing (SPEC section 1), shared by the CPU and CUDA
// paths so that both compute bit-identical block scores and so pick the same
// blocks even on near-ties:
//   - block sums in double, rows added in order;
//   - the mean of K over all rows as the sum of its block sums, blocks in order;
//   - means by one correctly rounded division; scores as a dot product over
//     the head dim in order, every product and sum rounded on its own (no FMA).
// Inputs of every supported dtype convert to double exactly.
#pragma once

#include <cmath>
#include <cstdint>

#include "slattn/macros.h"

namespace slattn::route_math {

SLATTN_HOST_DEVICE inline double add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

SLATTN_HOST_DEVICE inline double mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

SLATTN_HOST_DEVICE inline double div(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// Score of query-block mean q_mean (already divided) against key block sums
// k_sum of `count` rows, smoothed by k_mean: q̄ · (k_sum / count - k_mean).
SLATTN_HOST_DEVICE inline double block_score(const double* q_mean, const double* k_sum, const double* k_mean,
                                             int64_t count, int64_t dim) {
  double score = 0.0;
  for (int64_t c = 0; c < dim; ++c) {
    const double k_bar = add(div(k_sum[c], static_cast<double>(count)), -k_mean[c]);
    score = add(score, mul(q_mean[c], k_bar));
  }
  return score;
}

// Ranking key: NaN scores rank last, so that the order stays total.
SLATTN_HOST_DEVICE inline double rank_key(double score) {
  return score != score ? -HUGE_VAL : score;
}

// Whether block a outranks block b: higher key first, ties to the lower index.
SLATTN_HOST_DEVICE inline bool outranks(double key_a, int64_t a, double key_b, int64_t b) {
  return key_a > key_b || (key_a == key_b && a < b);
}

}  // namespace slattn::route_math
