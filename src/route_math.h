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

// One channel of k̄: the sum k_sum of a key block's `count` rows as a mean,
// smoothed by the mean k_mean of K: k_sum / count - k_mean.
SLATTN_HOST_DEVICE inline double smoothed_key_mean(double k_sum, int64_t count, double k_mean) {
  return add(div(k_sum, static_cast<double>(count)), -k_mean);
}

// One step of a score: the running sum plus the product of one channel.
SLATTN_HOST_DEVICE inline double score_step(double score, double q_mean, double k_bar) {
  return add(score, mul(q_mean, k_bar));
}

// Score of query-block mean q_mean (already divided) against key block sums
// k_sum of `count` rows, smoothed by k_mean: q̄ · (k_sum / count - k_mean).
// A path that keeps k̄ (smoothed_key_mean) and sums score_step over the
// channels in order from 0.0 gets the same bits.
SLATTN_HOST_DEVICE inline double block_score(const double* q_mean, const double* k_sum, const double* k_mean,
                                             int64_t count, int64_t dim) {
  double score = 0.0;
  for (int64_t c = 0; c < dim; ++c)
    score = score_step(score, q_mean[c], smoothed_key_mean(k_sum[c], count, k_mean[c]));
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
