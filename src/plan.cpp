// Plan shape checks and the row/column block lists built from a block map.
#include <algorithm>
#include <cmath>

#include "cuda/device.h"
#ifdef SLATTN_WITH_CUDA
#include "cuda/sla_cuda.h"
#endif
#include "slattn/error.h"
#include "slattn/route.h"
#include "slattn/sla.h"

namespace slattn {

void check_plan(const RoutingPlanView& plan, const PlanShape& expected) {
  SLATTN_CHECK(plan.block_map && plan.row_count && plan.row_index && plan.col_count && plan.col_index,
               "plan: every buffer (block_map, row_count, row_index, col_count, col_index) must be set");
  const PlanShape& s = plan.shape;
  SLATTN_CHECK(s.batch == expected.batch && s.heads == expected.heads && s.q_len == expected.q_len &&
                   s.k_len == expected.k_len && s.block_q == expected.block_q && s.block_k == expected.block_k,
               "plan: shape (batch=", s.batch, ", heads=", s.heads, ", q_len=", s.q_len, ", k_len=", s.k_len,
               ", block_q=", s.block_q, ", block_k=", s.block_k, ") does not match the inputs (batch=", expected.batch,
               ", heads=", expected.heads, ", q_len=", expected.q_len, ", k_len=", expected.k_len,
               ", block_q=", expected.block_q, ", block_k=", expected.block_k, ")");
}

int64_t critical_blocks_per_row(double topk, int64_t k_blocks) {
  SLATTN_CHECK(topk > 0.0 && topk <= 1.0, "topk must be in (0, 1], got ", topk);
  const auto floor_count = static_cast<int64_t>(std::floor(topk * static_cast<double>(k_blocks)));
  return std::clamp<int64_t>(floor_count, 1, k_blocks);
}

int64_t negligible_blocks_per_row(double topk, double negligible, int64_t k_blocks) {
  SLATTN_CHECK(negligible >= 0.0 && negligible < 1.0, "negligible must be in [0, 1), got ", negligible);
  SLATTN_CHECK(topk + negligible <= 1.0, "topk + negligible must be <= 1, got ", topk, " + ", negligible);
  const auto floor_count = static_cast<int64_t>(std::floor(negligible * static_cast<double>(k_blocks)));
  return std::min(floor_count, k_blocks - critical_blocks_per_row(topk, k_blocks));
}

void build_block_lists(const RoutingPlanView& plan, void* stream) {
  check_plan(plan, plan.shape);
  if (cuda::is_device_pointer(plan.block_map)) {
#ifdef SLATTN_WITH_CUDA
    cuda::build_block_lists(plan, static_cast<cudaStream_t>(stream));
    return;
#else
    throw Unsupported("build_block_lists: this build has no CUDA kernels; pass host (CPU) memory");
#endif
  }
  (void)stream;
  const PlanShape& s = plan.shape;
  const int64_t q_blocks = s.q_blocks();
  const int64_t k_blocks = s.k_blocks();
  for (int64_t pair = 0; pair < s.batch * s.heads; ++pair) {
    const int8_t* map = plan.block_map + pair * q_blocks * k_blocks;
    int32_t* row_count = plan.row_count + pair * q_blocks;
    int32_t* row_index = plan.row_index + pair * q_blocks * k_blocks;
    int32_t* col_count = plan.col_count + pair * k_blocks;
    int32_t* col_index = plan.col_index + pair * k_blocks * q_blocks;
    std::fill(col_count, col_count + k_blocks, 0);
    std::fill(col_index, col_index + k_blocks * q_blocks, -1);
    for (int64_t m = 0; m < q_blocks; ++m) {
      int32_t count = 0;
      for (int64_t n = 0; n < k_blocks; ++n) {
        const int8_t cls = map[m * k_blocks + n];
        SLATTN_CHECK(cls == kNegligible || cls == kMarginal || cls == kCritical,
                     "block_map values must be -1 (negligible), 0 (marginal) or 1 (critical), got ",
                     static_cast<int>(cls));
        if (cls != kCritical) continue;
        row_index[m * k_blocks + count++] = static_cast<int32_t>(n);
        col_index[n * q_blocks + col_count[n]++] = static_cast<int32_t>(m);
      }
      row_count[m] = count;
      std::fill(row_index + m * k_blocks + count, row_index + (m + 1) * k_blocks, -1);
    }
  }
}

}  // namespace slattn
