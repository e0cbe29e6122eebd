// The stages of the CUDA router that live in files of their own (route.cu
// runs them in order), and the error bound that ties two of them together.
//
// Why two kinds of scores: the exact score of route_math.h (fp64, every
// product and sum rounded on its own, so no FMA and no tensor cores) costs 2 D
// fp64 operations per (query block, key block) pair: ~50 µs for all Mq x Nk
// pairs of B1 H12 L32760 D128 on an H100, half the router's budget. So every
// pair gets an approximate score on tensor cores (route_scores.cu) whose
// distance to the exact one is bounded (score_error_bound), and the exact
// score is computed only for the blocks whose class that bound leaves open
// (route_classify.cu). The classes are those of the exact scores, bit for bit
// the CPU router's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "slattn/plan.h"

namespace slattn::cuda {

// |approximate score - exact score| <= kScoreRelativeError |q̄| |k̄|
//                                     + kScoreAbsoluteError (|q̄| + |k̄| + 1);
// route_scores.cu derives it.
inline constexpr float kScoreRelativeError = 0x1.8p-10f;
inline constexpr float kScoreAbsoluteError = 0x1p-116f;

// The bound for norms at least |q̄| and |k̄|, rounded up; not finite when
// they are not (the approximate scores are then not to be trusted).
__device__ __forceinline__ float score_error_bound(float q_norm, float k_norm) {
  const float relative = __fmul_ru(__fmul_ru(kScoreRelativeError, q_norm), k_norm);
  const float absolute = __fmul_ru(kScoreAbsoluteError, __fadd_ru(__fadd_ru(q_norm, k_norm), 1.0f));
  return __fadd_ru(relative, absolute);
}

// Approximate scores q̃ · k̃ of every (b, query head, m, n): q_approx
// (B, Hq, Mq, D) and k_approx (B, Hkv, Nk, D) row-major, 16-byte aligned;
// scores (B, Hq, Mq, Nk).
void launch_approximate_scores(const float* q_approx, const float* k_approx, const PlanShape& shape,
                               int64_t kv_heads, int64_t dim, float* scores, cudaStream_t stream);

struct ClassifyArgs {
  const float* scores;      // (B, Hq, Mq, Nk) approximate scores
  const double* q_means;    // (B, Hq, Mq, D) q̄
  const double* k_means;    // (B, Hkv, Nk, D) k̄ (smoothed)
  const float* q_norms;     // (B, Hq, Mq): at least |q̄_m|
  const float* k_norm_max;  // (B, Hkv): at least max_n |k̄_n|
  PlanShape shape;
  int64_t dim;
  int64_t kv_heads;
  int n_crit;
  int n_negl;
  int8_t* block_map;
  int32_t* row_count;
  int32_t* row_index;
};

// The block map row, row count and row list of every query block.
void launch_classify(const ClassifyArgs& args, cudaStream_t stream);

}  // namespace slattn::cuda
