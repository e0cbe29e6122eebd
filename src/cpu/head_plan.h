// The routing plan of one (batch, head) pair, as the CPU branches read it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "slattn/options.h"
#include "slattn/plan.h"

namespace slattn::cpu {

struct HeadPlan {
  const int8_t* block_map = nullptr;   // (Mq, Nk)
  const int32_t* row_count = nullptr;  // (Mq)
  const int32_t* row_index = nullptr;  // (Mq, Nk)
  PlanShape shape;

  static HeadPlan of(const RoutingPlanView& plan, int64_t b, int64_t h) {
    const PlanShape& s = plan.shape;
    const int64_t pair = b * s.heads + h;
    HeadPlan head;
    head.shape = s;
    head.block_map = plan.block_map + pair * s.q_blocks() * s.k_blocks();
    head.row_count = plan.row_count + pair * s.q_blocks();
    head.row_index = plan.row_index + pair * s.q_blocks() * s.k_blocks();
    return head;
  }

  int64_t q_blocks() const { return shape.q_blocks(); }
  int64_t k_blocks() const { return shape.k_blocks(); }
  int64_t q_begin(int64_t m) const { return m * shape.block_q; }
  int64_t q_end(int64_t m) const { return std::min(shape.q_len, (m + 1) * shape.block_q); }
  int64_t k_begin(int64_t n) const { return n * shape.block_k; }
  int64_t k_end(int64_t n) const { return std::min(shape.k_len, (n + 1) * shape.block_k); }
  int8_t block_class(int64_t m, int64_t n) const { return block_map[m * k_blocks() + n]; }
  int64_t critical_count(int64_t m) const { return row_count[m]; }
  int64_t critical_block(int64_t m, int64_t i) const { return row_index[m * k_blocks() + i]; }

  // Whether key block n belongs to the linear set U_m (SPEC section 3).
  bool in_linear_set(int64_t m, int64_t n, LinearScope scope) const {
    const int8_t cls = block_class(m, n);
    return scope == LinearScope::marginal ? cls == kMarginal : cls != kNegligible;
  }
};

}  // namespace slattn::cpu
