// Routing (SPEC section 1): block scores, the three classes, the block lists.
#pragma once

#include <cstddef>

#include "slattn/plan.h"
#include "slattn/tensor_view.h"

namespace slattn {

// Pooled router of SLA. q is (B, Hq, Lq, D), k is (B, Hkv, Lk, D) with Hq a
// multiple of Hkv; plan.shape must be (B, Hq, Lq, Lk, block_q, block_k).
struct RouteParams {
  TensorView q;
  TensorView k;
  double topk = 0.0;        // fraction of key blocks kept critical per row, in (0, 1]
  double negligible = 0.0;  // fraction of key blocks skipped per row, in [0, 1 - topk]

  // Device data only (see SlaForwardParams): stream and scratch memory of at
  // least route_workspace_bytes() bytes.
  void* stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Number of critical and negligible blocks per row for Nk key blocks.
int64_t critical_blocks_per_row(double topk, int64_t k_blocks);
int64_t negligible_blocks_per_row(double topk, double negligible, int64_t k_blocks);

// Fills plan.block_map and the row and column lists.
void route(const RouteParams& params, const RoutingPlanView& plan);
size_t route_workspace_bytes(const RouteParams& params, const RoutingPlanView& plan);

// Fills the row and column lists of `plan` from its block_map (for plans built
// from a user-supplied block map). Throws if the map holds a value other than
// -1, 0 or 1. For a device plan it runs on `stream` and waits for it, to report
// invalid values.
void build_block_lists(const RoutingPlanView& plan, void* stream = nullptr);

}  // namespace slattn
