// The routing plan: which key blocks each query block attends to exactly.
//
// Produced once per layer call (by route() or from a user block map) and read
// by both the forward and the backward pass. All buffers are caller-owned,
// contiguous, and live on the same device as the attention inputs.
#pragma once

#include <cstdint>

#include "slattn/macros.h"

namespace slattn {

// Block classes stored in the block map (SPEC section 1).
enum BlockClass : int8_t { kNegligible = -1, kMarginal = 0, kCritical = 1 };

// Shape of a plan. `heads` counts query heads: with grouped-query attention each
// query head routes on its own, against the K of its key/value head.
struct PlanShape {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t q_len = 0;
  int64_t k_len = 0;
  int64_t block_q = 64;
  int64_t block_k = 64;

  SLATTN_HOST_DEVICE int64_t q_blocks() const { return (q_len + block_q - 1) / block_q; }  // Mq
  SLATTN_HOST_DEVICE int64_t k_blocks() const { return (k_len + block_k - 1) / block_k; }  // Nk
  SLATTN_HOST_DEVICE int64_t rows() const { return batch * heads * q_blocks(); }           // query-block rows
  SLATTN_HOST_DEVICE int64_t cols() const { return batch * heads * k_blocks(); }           // key-block columns
};

// Views of the plan's buffers, for one (batch, head) pair laid out row-major:
//   block_map  (B, H, Mq, Nk) int8   BlockClass of every block
//   row_count  (B, H, Mq)     int32  number of critical key blocks of query block m
//   row_index  (B, H, Mq, Nk) int32  those key blocks, ascending, then padding (-1)
//   col_count  (B, H, Nk)     int32  number of query blocks that chose key block n
//   col_index  (B, H, Nk, Mq) int32  those query blocks, ascending, then padding (-1)
struct RoutingPlanView {
  PlanShape shape;
  int8_t* block_map = nullptr;
  int32_t* row_count = nullptr;
  int32_t* row_index = nullptr;
  int32_t* col_count = nullptr;
  int32_t* col_index = nullptr;
};

// Validates that every buffer of `plan` is set and its shape matches `expected`.
void check_plan(const RoutingPlanView& plan, const PlanShape& expected);

}  // namespace slattn
