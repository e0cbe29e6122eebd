#include "validate.h"

#include <cmath>
#include <string>

#include "slattn/sla.h"

namespace slattn {
namespace {

std::string shape_string(const TensorView& view) {
  return detail::concat("(", view.size[0], ", ", view.size[1], ", ", view.size[2], ", ", view.size[3], ")");
}

void check_defined(const TensorView& view, const char* name) {
  SLATTN_CHECK(view.defined(), name, " is required");
  for (int axis = 0; axis < 4; ++axis) SLATTN_CHECK(view.size[axis] >= 0, name, " has a negative size");
}

// q (B, Hq, Lq, D) and k (B, Hkv, Lk, D).
void check_query_key(const TensorView& q, const TensorView& k) {
  check_defined(q, "q");
  check_defined(k, "k");
  SLATTN_CHECK(q.dtype == k.dtype, "q and k must have the same dtype, got ", dtype_name(q.dtype), " and ",
               dtype_name(k.dtype));
  SLATTN_CHECK(q.batch() >= 1 && q.heads() >= 1 && k.heads() >= 1, "q and k need at least one batch and one head");
  SLATTN_CHECK(q.length() >= 1, "q must hold at least one token (sequence length ", q.length(), ")");
  SLATTN_CHECK(k.length() >= 1, "k must hold at least one token (sequence length ", k.length(), ")");
  SLATTN_CHECK(k.batch() == q.batch(), "k batch ", k.batch(), " does not match q batch ", q.batch());
  SLATTN_CHECK(k.head_dim() == q.head_dim(), "head dims of q and k differ: ", q.head_dim(), " and ", k.head_dim());
  const int64_t dim = q.head_dim();
  SLATTN_CHECK(dim > 0 && dim <= kMaxHeadDim && dim % kHeadDimMultiple == 0,
               "head_dim must be a multiple of ", kHeadDimMultiple, " in [", kHeadDimMultiple, ", ", kMaxHeadDim,
               "], got ", dim);
  SLATTN_CHECK(q.heads() % k.heads() == 0, "q heads (", q.heads(), ") must be a multiple of k/v heads (", k.heads(),
               ")");
}

void check_like(const TensorView& view, const TensorView& reference, const char* name, const char* reference_name) {
  SLATTN_CHECK(view.size == reference.size, name, " must have the shape of ", reference_name, " ",
               shape_string(reference), ", got ", shape_string(view));
  SLATTN_CHECK(view.dtype == reference.dtype, name, " must have the dtype of ", reference_name, " (",
               dtype_name(reference.dtype), "), got ", dtype_name(view.dtype));
}

void check_optional_like(const TensorView& view, const TensorView& reference, const char* name,
                         const char* reference_name) {
  if (view.defined()) check_like(view, reference, name, reference_name);
}

void check_attention_inputs(const TensorView& q, const TensorView& k, const TensorView& v) {
  check_query_key(q, k);
  check_defined(v, "v");
  check_like(v, k, "v", "k");
}

void check_block_sizes(const PlanShape& shape) {
  SLATTN_CHECK(shape.block_q >= 1 && shape.block_q <= kMaxBlockSize, "block_q must be in [1, ", kMaxBlockSize,
               "], got ", shape.block_q);
  SLATTN_CHECK(shape.block_k >= 1 && shape.block_k <= kMaxBlockSize, "block_k must be in [1, ", kMaxBlockSize,
               "], got ", shape.block_k);
}

void check_scale(double scale) {
  SLATTN_CHECK(std::isfinite(scale) && scale != 0.0, "scale must be finite and non-zero, got ", scale);
}

void check_projection_dtype(DType proj, DType input) {
  SLATTN_CHECK(proj == DType::float32 || (proj == DType::float64 && input == DType::float64),
               "proj_weight/proj_bias must be float32 (or float64 with float64 inputs), got ", dtype_name(proj));
}

// W_q and W_k are given exactly when φ has weights, in a dtype the core reads.
void check_feature_weights(FeatureMap feature_map, const FeatureWeights& w, DType input) {
  if (!has_feature_weights(feature_map)) {
    SLATTN_CHECK(w.q == nullptr && w.k == nullptr, "feature_weight_q/feature_weight_k are given, but feature_map '",
                 feature_map_name(feature_map), "' has no weights (only 'hedgehog' has)");
    return;
  }
  SLATTN_CHECK(w.q != nullptr, "feature_weight_q is required with feature_map 'hedgehog'");
  SLATTN_CHECK(w.k != nullptr,
               "feature_weight_k is required with feature_map 'hedgehog' (pass feature_weight_q again to tie them)");
  SLATTN_CHECK(w.dtype == DType::float32 || (w.dtype == DType::float64 && input == DType::float64),
               "feature_weight_q/feature_weight_k must be float32 (or float64 with float64 inputs), got ",
               dtype_name(w.dtype));
}

// One gradient per distinct weight: tied weights share one output, untied ones
// need two that do not alias.
void check_feature_weight_grads(const SlaBackwardParams& p) {
  if (!has_feature_weights(p.feature_map)) {
    SLATTN_CHECK(p.d_feature_weight_q == nullptr && p.d_feature_weight_k == nullptr,
                 "d_feature_weight_q/d_feature_weight_k are given, but feature_map '",
                 feature_map_name(p.feature_map), "' has no weights");
    return;
  }
  SLATTN_CHECK(p.d_feature_weight_q != nullptr, "d_feature_weight_q is required with feature_map 'hedgehog'");
  SLATTN_CHECK(p.d_feature_weight_k != nullptr, "d_feature_weight_k is required with feature_map 'hedgehog'");
  if (p.feature_weights.tied()) {
    SLATTN_CHECK(p.d_feature_weight_k == p.d_feature_weight_q,
                 "d_feature_weight_k must be d_feature_weight_q when the feature weights are tied "
                 "(feature_weight_k == feature_weight_q): their one gradient, the sum of both, is written once");
  } else {
    SLATTN_CHECK(p.d_feature_weight_k != p.d_feature_weight_q,
                 "d_feature_weight_k and d_feature_weight_q must differ for untied feature weights");
  }
}

}  // namespace

PlanShape expected_plan_shape(const TensorView& q, const TensorView& k, const PlanShape& plan) {
  PlanShape shape;
  shape.batch = q.batch();
  shape.heads = q.heads();
  shape.q_len = q.length();
  shape.k_len = k.length();
  shape.block_q = plan.block_q;
  shape.block_k = plan.block_k;
  return shape;
}

void validate(const RouteParams& p, const RoutingPlanView& plan) {
  check_query_key(p.q, p.k);
  check_block_sizes(plan.shape);
  check_plan(plan, expected_plan_shape(p.q, p.k, plan.shape));
  negligible_blocks_per_row(p.topk, p.negligible, plan.shape.k_blocks());  // checks topk and negligible
}

void validate(const SlaForwardParams& p, const RoutingPlanView& plan) {
  check_attention_inputs(p.q, p.k, p.v);
  check_block_sizes(plan.shape);
  check_plan(plan, expected_plan_shape(p.q, p.k, plan.shape));
  check_scale(p.scale);
  check_defined(p.out, "out");
  check_like(p.out, p.q, "out", "q");
  check_optional_like(p.out_sparse, p.q, "out_sparse", "q");
  check_optional_like(p.out_linear, p.q, "out_linear", "q");
  SLATTN_CHECK(p.lse != nullptr, "lse is required");
  SLATTN_CHECK(p.proj_bias == nullptr || p.proj_weight != nullptr, "proj_bias needs proj_weight");
  if (p.proj_weight) check_projection_dtype(p.proj_dtype, p.q.dtype);
  check_feature_weights(p.feature_map, p.feature_weights, p.q.dtype);
}

void validate(const SlaBackwardParams& p, const RoutingPlanView& plan) {
  check_attention_inputs(p.q, p.k, p.v);
  check_block_sizes(plan.shape);
  check_plan(plan, expected_plan_shape(p.q, p.k, plan.shape));
  check_scale(p.scale);
  check_defined(p.out_sparse, "out_sparse");
  check_like(p.out_sparse, p.q, "out_sparse", "q");
  SLATTN_CHECK(p.lse != nullptr, "lse is required");
  check_defined(p.dout, "dout");
  check_like(p.dout, p.q, "dout", "q");
  check_optional_like(p.dout_sparse, p.q, "dout_sparse", "q");
  check_optional_like(p.dout_linear, p.q, "dout_linear", "q");
  check_defined(p.dq, "dq");
  check_like(p.dq, p.q, "dq", "q");
  check_defined(p.dk, "dk");
  check_like(p.dk, p.k, "dk", "k");
  check_defined(p.dv, "dv");
  check_like(p.dv, p.v, "dv", "v");
  SLATTN_CHECK(!p.has_proj_bias || p.proj_weight != nullptr, "proj_bias needs proj_weight");
  if (p.proj_weight) {
    check_projection_dtype(p.proj_dtype, p.q.dtype);
    SLATTN_CHECK(p.d_proj_weight != nullptr, "d_proj_weight is required when proj_weight is given");
  }
  SLATTN_CHECK(!p.has_proj_bias || p.d_proj_bias != nullptr, "d_proj_bias is required when the bias is given");
  check_feature_weights(p.feature_map, p.feature_weights, p.q.dtype);
  check_feature_weight_grads(p);
}

}  // namespace slattn
