// Argument validation: every bad input throws slattn::Error naming the
// argument, before any data is read. Each test starts from a valid call (see
// ValidCallsPass) and breaks exactly one thing; replacement tensors are
// allocated at their own shape so that a missing check fails the test instead
// of reading out of bounds.
#include <gtest/gtest.h>

#include <vector>

#include "test_util.h"

namespace slattn_test {
namespace {

using slattn::FeatureMap;
using slattn::LinearScope;

constexpr DType kF64 = DType::float64;

Problem small_problem() {
  Problem p;
  p.q_heads = 2;
  p.kv_heads = 2;
  p.q_len = 32;
  p.k_len = 32;
  p.dim = 16;
  return p;
}

class Validation : public ::testing::Test {
 protected:
  const Problem p = small_problem();
  const Inputs<double> in = random_inputs(p, 5, kF64, true, true, kF64);
  HostTensor q{in.q, kF64, q_size(p), Layout::HND};
  HostTensor k{in.k, kF64, kv_size(p), Layout::HND};
  HostTensor v{in.v, kF64, kv_size(p), Layout::HND};
  HostTensor out{kF64, q_size(p), Layout::HND};
  HostTensor dq{kF64, q_size(p), Layout::HND};
  HostTensor dk{kF64, kv_size(p), Layout::HND};
  HostTensor dv{kF64, kv_size(p), Layout::HND};
  Buffer lse{kF64, p.lse_count()};
  Buffer weight{kF64, in.proj_weight};
  Buffer bias{kF64, in.proj_bias};
  Buffer d_weight{kF64, p.dim * p.dim};
  Buffer d_bias{kF64, p.dim};
  Buffer feature_q{kF64, random_feature_weight(p.dim, 7, kF64)};
  Buffer feature_k{kF64, random_feature_weight(p.dim, 8, kF64)};
  Buffer d_feature_q{kF64, p.dim * p.dim};
  Buffer d_feature_k{kF64, p.dim * p.dim};
  PlanStorage plan = route_plan(p, q.view(), k.view());

  slattn::RouteParams route_params() { return {q.view(), k.view(), p.topk, p.negligible}; }

  slattn::SlaForwardParams forward_params() {
    slattn::SlaForwardParams params;
    params.q = q.view();
    params.k = k.view();
    params.v = v.view();
    params.proj_weight = weight.data();
    params.proj_bias = bias.data();
    params.proj_dtype = kF64;
    params.out = out.view();
    params.lse = lse.data();
    params.scale = p.softmax_scale();
    return params;
  }

  // The forward's out and lse stand in for Os and LSE: validation reads neither.
  slattn::SlaBackwardParams backward_params() {
    slattn::SlaBackwardParams params;
    params.q = q.view();
    params.k = k.view();
    params.v = v.view();
    params.out_sparse = out.view();
    params.lse = lse.data();
    params.proj_weight = weight.data();
    params.has_proj_bias = true;
    params.proj_dtype = kF64;
    params.dout = out.view();
    params.dq = dq.view();
    params.dk = dk.view();
    params.dv = dv.view();
    params.d_proj_weight = d_weight.data();
    params.d_proj_bias = d_bias.data();
    params.scale = p.softmax_scale();
    return params;
  }

  // Hedgehog with untied weights: the valid call the feature-weight tests break.
  slattn::SlaForwardParams hedgehog_forward_params() {
    slattn::SlaForwardParams params = forward_params();
    params.feature_map = FeatureMap::hedgehog;
    params.feature_weights = {feature_q.data(), feature_k.data(), kF64};
    return params;
  }
  slattn::SlaBackwardParams hedgehog_backward_params() {
    slattn::SlaBackwardParams params = backward_params();
    params.feature_map = FeatureMap::hedgehog;
    params.feature_weights = {feature_q.data(), feature_k.data(), kF64};
    params.d_feature_weight_q = d_feature_q.data();
    params.d_feature_weight_k = d_feature_k.data();
    return params;
  }

  auto route_with(const slattn::RouteParams& params) {
    return [this, params] { slattn::route(params, plan.view()); };
  }
  auto forward_with(const slattn::SlaForwardParams& params) {
    return [this, params] { slattn::sla_forward(params, plan.view()); };
  }
  auto backward_with(const slattn::SlaBackwardParams& params) {
    return [this, params] { slattn::sla_backward(params, plan.view()); };
  }
};

TEST_F(Validation, ValidCallsPass) {
  EXPECT_NO_THROW(route_with(route_params())());
  EXPECT_NO_THROW(forward_with(forward_params())());
  EXPECT_NO_THROW(backward_with(backward_params())());
}

TEST_F(Validation, TopkOutsideZeroOne) {
  for (const double topk : {0.0, -0.25, 1.5}) {
    slattn::RouteParams params = route_params();
    params.topk = topk;
    EXPECT_TRUE(throws_naming(route_with(params), "topk")) << "topk " << topk;
  }
  EXPECT_TRUE(throws_naming([] { slattn::critical_blocks_per_row(0.0, 4); }, "topk"));
}

TEST_F(Validation, TopkPlusNegligibleAboveOne) {
  slattn::RouteParams params = route_params();
  params.topk = 0.8;
  params.negligible = 0.3;
  EXPECT_TRUE(throws_naming(route_with(params), "topk + negligible"));
}

TEST_F(Validation, HeadDimMismatch) {
  HostTensor wide_k(kF64, {1, 2, 32, 24}, Layout::HND);
  slattn::RouteParams params = route_params();
  params.k = wide_k.view();
  EXPECT_TRUE(throws_naming(route_with(params), "head dims of q and k"));
}

TEST_F(Validation, HeadDimNotAMultipleOfEightOrTooLarge) {
  for (const int64_t dim : {12, 264}) {
    HostTensor bad_q(kF64, {1, 2, 32, dim}, Layout::HND), bad_k(kF64, {1, 2, 32, dim}, Layout::HND);
    EXPECT_TRUE(throws_naming(route_with({bad_q.view(), bad_k.view(), 0.5, 0.0}), "head_dim")) << "dim " << dim;
  }
}

TEST_F(Validation, QueryHeadsNotAMultipleOfKeyHeads) {
  HostTensor three_heads(kF64, {1, 3, 32, 16}, Layout::HND);
  slattn::RouteParams params = route_params();
  params.q = three_heads.view();
  EXPECT_TRUE(throws_naming(route_with(params), "k/v heads"));
}

TEST_F(Validation, EmptySequence) {
  slattn::RouteParams params = route_params();
  params.q.size[slattn::kLength] = 0;
  EXPECT_TRUE(throws_naming(route_with(params), "q must hold at least one token"));
  params = route_params();
  params.k.size[slattn::kLength] = 0;
  EXPECT_TRUE(throws_naming(route_with(params), "k must hold at least one token"));
}

TEST_F(Validation, DtypeMismatch) {
  HostTensor k32(in.k, DType::float32, kv_size(p), Layout::HND), v32(in.v, DType::float32, kv_size(p), Layout::HND);
  HostTensor out32(DType::float32, q_size(p), Layout::HND);
  slattn::SlaForwardParams params = forward_params();
  params.k = k32.view();
  EXPECT_TRUE(throws_naming(forward_with(params), "q and k must have the same dtype"));
  params = forward_params();
  params.v = v32.view();
  EXPECT_TRUE(throws_naming(forward_with(params), "v must have the dtype of k"));
  params = forward_params();
  params.out = out32.view();
  EXPECT_TRUE(throws_naming(forward_with(params), "out must have the dtype of q"));
}

TEST_F(Validation, PlanShapeMismatch) {
  slattn::PlanShape shape = plan_shape(p);
  shape.q_len = 48;  // one query block more than q has
  PlanStorage wrong(shape);
  const slattn::SlaForwardParams params = forward_params();
  EXPECT_TRUE(throws_naming([&] { slattn::sla_forward(params, wrong.view()); }, "plan"));
  slattn::RoutingPlanView missing = plan.view();
  missing.col_index = nullptr;
  EXPECT_TRUE(throws_naming([&] { slattn::sla_forward(params, missing); }, "plan"));
}

TEST_F(Validation, BlockMapValueOutsideTheClasses) {
  plan.block_map[3] = 2;
  EXPECT_TRUE(throws_naming([this] { slattn::build_block_lists(plan.view()); }, "block_map"));
}

TEST_F(Validation, BlockSizeOutOfRange) {
  for (const int64_t block : {0, 1025}) {
    slattn::PlanShape shape = plan_shape(p);
    shape.block_k = block == 0 ? 1 : block;  // keep Nk well-defined for the buffers
    PlanStorage storage(shape);
    slattn::RoutingPlanView view = storage.view();
    view.shape.block_k = block;
    EXPECT_TRUE(throws_naming([&] { slattn::route(route_params(), view); }, "block_k")) << "block " << block;
  }
}

TEST_F(Validation, MissingOutputs) {
  slattn::SlaForwardParams params = forward_params();
  params.lse = nullptr;
  EXPECT_TRUE(throws_naming(forward_with(params), "lse is required"));
  params = forward_params();
  params.out = {};
  EXPECT_TRUE(throws_naming(forward_with(params), "out is required"));
  slattn::SlaBackwardParams backward = backward_params();
  backward.dq = {};
  EXPECT_TRUE(throws_naming(backward_with(backward), "dq is required"));
  backward = backward_params();
  backward.out_sparse = {};
  EXPECT_TRUE(throws_naming(backward_with(backward), "out_sparse is required"));
  backward = backward_params();
  backward.d_proj_weight = nullptr;
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_proj_weight"));
}

TEST_F(Validation, ProjBiasWithoutProjWeight) {
  slattn::SlaForwardParams params = forward_params();
  params.proj_weight = nullptr;
  EXPECT_TRUE(throws_naming(forward_with(params), "proj_bias"));
  slattn::SlaBackwardParams backward = backward_params();
  backward.proj_weight = nullptr;
  EXPECT_TRUE(throws_naming(backward_with(backward), "proj_bias"));
}

TEST_F(Validation, ZeroScale) {
  slattn::SlaForwardParams params = forward_params();
  params.scale = 0.0;
  EXPECT_TRUE(throws_naming(forward_with(params), "scale"));
}

TEST_F(Validation, HedgehogCallsPassTiedAndUntied) {
  EXPECT_NO_THROW(forward_with(hedgehog_forward_params())());
  EXPECT_NO_THROW(backward_with(hedgehog_backward_params())());
  slattn::SlaForwardParams forward = hedgehog_forward_params();
  forward.feature_weights.k = feature_q.data();
  EXPECT_NO_THROW(forward_with(forward)());
  slattn::SlaBackwardParams backward = hedgehog_backward_params();
  backward.feature_weights.k = feature_q.data();
  backward.d_feature_weight_k = d_feature_q.data();
  EXPECT_NO_THROW(backward_with(backward)());
}

TEST_F(Validation, FeatureWeightsMissingOrUnexpected) {
  slattn::SlaForwardParams forward = hedgehog_forward_params();
  forward.feature_weights.q = nullptr;
  EXPECT_TRUE(throws_naming(forward_with(forward), "feature_weight_q is required"));
  forward = hedgehog_forward_params();
  forward.feature_weights.k = nullptr;
  EXPECT_TRUE(throws_naming(forward_with(forward), "feature_weight_k is required"));
  forward = forward_params();  // softmax has no weights to take
  forward.feature_weights = {feature_q.data(), feature_q.data(), kF64};
  EXPECT_TRUE(throws_naming(forward_with(forward), "has no weights"));
  slattn::SlaBackwardParams backward = hedgehog_backward_params();
  backward.feature_weights.q = nullptr;
  EXPECT_TRUE(throws_naming(backward_with(backward), "feature_weight_q is required"));
  backward = backward_params();
  backward.d_feature_weight_q = d_feature_q.data();
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_feature_weight_q/d_feature_weight_k are given"));
}

TEST_F(Validation, FeatureWeightDtype) {
  for (const DType dtype : {DType::float16, DType::bfloat16}) {
    slattn::SlaForwardParams forward = hedgehog_forward_params();
    forward.feature_weights.dtype = dtype;
    EXPECT_TRUE(throws_naming(forward_with(forward), "feature_weight_q/feature_weight_k must be float32"));
    slattn::SlaBackwardParams backward = hedgehog_backward_params();
    backward.feature_weights.dtype = dtype;
    EXPECT_TRUE(throws_naming(backward_with(backward), "feature_weight_q/feature_weight_k must be float32"));
  }
}

TEST_F(Validation, FeatureWeightGradientOutputs) {
  slattn::SlaBackwardParams backward = hedgehog_backward_params();
  backward.d_feature_weight_q = nullptr;
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_feature_weight_q is required"));
  backward = hedgehog_backward_params();
  backward.d_feature_weight_k = nullptr;
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_feature_weight_k is required"));
  backward = hedgehog_backward_params();  // untied: two gradients that must not alias
  backward.d_feature_weight_k = d_feature_q.data();
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_feature_weight_k and d_feature_weight_q must differ"));
  backward = hedgehog_backward_params();  // tied: one gradient, one buffer
  backward.feature_weights.k = feature_q.data();
  EXPECT_TRUE(throws_naming(backward_with(backward), "d_feature_weight_k must be d_feature_weight_q"));
}

TEST(ValidationOptions, ParsersNameTheArgument) {
  EXPECT_EQ(slattn::parse_feature_map("relu"), FeatureMap::relu);
  EXPECT_EQ(slattn::parse_feature_map("hedgehog"), FeatureMap::hedgehog);
  EXPECT_EQ(slattn::feature_map_name(FeatureMap::hedgehog), "hedgehog");
  EXPECT_EQ(slattn::parse_linear_scope("all"), LinearScope::all);
  EXPECT_TRUE(throws_naming([] { slattn::parse_feature_map("hedgehogx"); }, "feature_map"));
  EXPECT_TRUE(throws_naming([] { slattn::parse_linear_scope("bogus"); }, "linear_scope"));
}

TEST(ValidationOptions, ThreadCountMustBePositive) {
  EXPECT_TRUE(throws_naming([] { slattn::set_num_threads(0); }, "num_threads"));
}

}  // namespace
}  // namespace slattn_test
