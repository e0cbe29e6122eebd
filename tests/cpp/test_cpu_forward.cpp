// sla_forward on the CPU (SPEC sections 2-4) against the naive reference:
// float64 to 1e-10, float32 / bf16 / fp16 against a same-precision baseline
// (STYLE.md rule 7), every feature map and scope, both layouts, edge shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace slattn_test {
namespace {

using slattn::FeatureMap;
using slattn::LinearScope;

constexpr double kFloat64Tolerance = 1e-10;

struct RunOptions {
  DType dtype = DType::float64;
  Layout layout = Layout::HND;
  DType proj_dtype = DType::float64;
  bool branch_outputs = true;                    // ask for out_sparse and out_linear
  const std::vector<int8_t>* block_map = nullptr;  // route() when null
};

struct ForwardRun {
  std::vector<int8_t> block_map;
  Outputs<double> outputs;  // out_sparse / out_linear empty unless asked for
};

// Routes (or takes `options.block_map`), then runs the library's forward.
// Outputs start as NaN so that an element the library skips cannot pass.
ForwardRun run_forward(const Problem& p, const Inputs<double>& in, const RunOptions& options) {
  const std::vector<double> nan(static_cast<size_t>(p.q_count()), std::numeric_limits<double>::quiet_NaN());
  HostTensor q(in.q, options.dtype, q_size(p), options.layout);
  HostTensor k(in.k, options.dtype, kv_size(p), options.layout);
  HostTensor v(in.v, options.dtype, kv_size(p), options.layout);
  HostTensor out(nan, options.dtype, q_size(p), options.layout);
  HostTensor out_sparse(nan, options.dtype, q_size(p), options.layout);
  HostTensor out_linear(nan, options.dtype, q_size(p), options.layout);
  Buffer lse(slattn::lse_dtype(options.dtype), std::vector<double>(static_cast<size_t>(p.lse_count()), nan[0]));
  Buffer weight(options.proj_dtype, in.proj_weight), bias(options.proj_dtype, in.proj_bias);
  FeatureWeightStorage feature_weights(in, options.proj_dtype);

  PlanStorage plan(plan_shape(p));
  if (options.block_map) {
    plan.block_map = *options.block_map;
    slattn::build_block_lists(plan.view());
  } else {
    slattn::route({q.view(), k.view(), p.topk, p.negligible}, plan.view());
  }
  slattn::SlaForwardParams params;
  params.q = q.view();
  params.k = k.view();
  params.v = v.view();
  params.proj_weight = in.proj_weight.empty() ? nullptr : weight.data();
  params.proj_bias = in.proj_bias.empty() ? nullptr : bias.data();
  params.proj_dtype = options.proj_dtype;
  params.out = out.view();
  if (options.branch_outputs) {
    params.out_sparse = out_sparse.view();
    params.out_linear = out_linear.view();
  }
  params.lse = lse.data();
  params.scale = p.softmax_scale();
  params.feature_map = p.feature_map;
  params.feature_weights = feature_weights.view();
  params.linear_scope = p.scope;
  slattn::sla_forward(params, plan.view());

  ForwardRun run{plan.block_map, {out.values(), {}, {}, lse.values()}};
  if (options.branch_outputs) {
    run.outputs.out_sparse = out_sparse.values();
    run.outputs.out_linear = out_linear.values();
  }
  return run;
}

// Routes with the library, checks the map against the naive router, and
// compares every output with the float64 reference.
void expect_matches_reference(const Problem& p, const Inputs<double>& in, const RunOptions& options) {
  const ForwardRun run = run_forward(p, in, options);
  const std::vector<int8_t> map = options.block_map ? *options.block_map : reference_block_map(p, in.q, in.k);
  ASSERT_EQ(run.block_map, map);
  const Outputs<double> expected = reference_forward(p, map, in);
  EXPECT_TRUE(all_close(run.outputs.out, expected.out, kFloat64Tolerance)) << "out";
  EXPECT_TRUE(all_close(run.outputs.lse, expected.lse, kFloat64Tolerance)) << "lse";
  if (!options.branch_outputs) return;
  EXPECT_TRUE(all_close(run.outputs.out_sparse, expected.out_sparse, kFloat64Tolerance)) << "out_sparse";
  EXPECT_TRUE(all_close(run.outputs.out_linear, expected.out_linear, kFloat64Tolerance)) << "out_linear";
}

// Mq = 5, Nk = 4 (ragged on both sides): 2 critical, 1 marginal, 1 negligible
// per row, so that the two scopes and the three classes all matter.
Problem ragged_problem(FeatureMap map, LinearScope scope) {
  return {.batch = 2, .q_heads = 2, .kv_heads = 2, .q_len = 70, .k_len = 53, .dim = 16, .negligible = 0.25,
          .feature_map = map, .scope = scope};
}

enum class Projection { none, weight, weight_and_bias };

using Float64Param = std::tuple<FeatureMap, LinearScope, Projection, Layout>;
class ForwardFloat64 : public ::testing::TestWithParam<Float64Param> {};

TEST_P(ForwardFloat64, MatchesReference) {
  const auto [map, scope, projection, layout] = GetParam();
  const Problem p = ragged_problem(map, scope);
  const Inputs<double> in = random_inputs(p, 11, DType::float64, projection != Projection::none,
                                          projection == Projection::weight_and_bias, DType::float64);
  RunOptions options;
  options.layout = layout;
  expect_matches_reference(p, in, options);
}

std::string float64_name(const ::testing::TestParamInfo<Float64Param>& info) {
  const auto [map, scope, projection, layout] = info.param;
  const char* projection_names[] = {"NoProjection", "Weight", "WeightAndBias"};
  return slattn::feature_map_name(map) + "_" + slattn::linear_scope_name(scope) + "_" +
         projection_names[static_cast<int>(projection)] + (layout == Layout::HND ? "_HND" : "_NHD");
}

INSTANTIATE_TEST_SUITE_P(
    AllOptions, ForwardFloat64,
    ::testing::Combine(::testing::Values(FeatureMap::softmax, FeatureMap::elu, FeatureMap::relu,
                                         FeatureMap::hedgehog),
                       ::testing::Values(LinearScope::marginal, LinearScope::all),
                       ::testing::Values(Projection::none, Projection::weight, Projection::weight_and_bias),
                       ::testing::Values(Layout::HND, Layout::NHD)),
    float64_name);

struct EdgeCase {
  std::string name;
  Layout layout;
  Problem problem;  // its scope comes from the test parameter
};

class ForwardEdgeShapes : public ::testing::TestWithParam<std::tuple<EdgeCase, LinearScope>> {};

TEST_P(ForwardEdgeShapes, MatchesReference) {
  const auto& [edge, scope] = GetParam();
  Problem p = edge.problem;
  p.scope = scope;
  const Inputs<double> in = random_inputs(p, 23, DType::float64, true, true, DType::float64);
  RunOptions options;
  options.layout = edge.layout;
  expect_matches_reference(p, in, options);
}

const EdgeCase kEdgeCases[] = {
    {"SingleToken", Layout::HND, {.q_len = 1, .k_len = 1}},
    {"Length70Block16", Layout::HND,
     {.q_len = 70, .k_len = 70, .topk = 0.4, .negligible = 0.2, .feature_map = FeatureMap::elu}},
    {"UnequalLengths", Layout::NHD,
     {.q_heads = 2, .kv_heads = 2, .q_len = 37, .k_len = 90, .dim = 16, .block_q = 8, .topk = 0.3,
      .negligible = 0.3, .feature_map = FeatureMap::relu}},
    {"SingleBlock", Layout::HND, {.q_heads = 2, .kv_heads = 2, .q_len = 16, .k_len = 16, .dim = 16}},
    {"BlocksOfOneRow", Layout::HND,
     {.q_len = 9, .k_len = 12, .block_q = 1, .block_k = 1, .topk = 0.25, .negligible = 0.25,
      .feature_map = FeatureMap::elu}},
    {"OnePartialLargeBlock", Layout::HND,
     {.q_len = 30, .k_len = 45, .block_q = 1024, .block_k = 1024, .feature_map = FeatureMap::relu}},
    {"GqaFourOverTwo", Layout::NHD,
     {.q_heads = 4, .kv_heads = 2, .q_len = 40, .k_len = 56, .dim = 16, .block_k = 8, .topk = 0.4,
      .negligible = 0.2}},
    {"GqaFourOverOne", Layout::HND,
     {.q_heads = 4, .kv_heads = 1, .q_len = 40, .k_len = 56, .dim = 16, .block_k = 8, .topk = 0.4,
      .negligible = 0.2, .feature_map = FeatureMap::elu}},
    {"HeadDim24", Layout::NHD,
     {.q_heads = 2, .kv_heads = 1, .q_len = 50, .k_len = 50, .dim = 24, .negligible = 0.25,
      .feature_map = FeatureMap::relu}},
    {"HeadDim64", Layout::HND, {.q_len = 40, .k_len = 64, .dim = 64, .negligible = 0.25}},
    {"CustomScale", Layout::HND,
     {.q_len = 48, .k_len = 48, .dim = 16, .topk = 0.34, .negligible = 0.34, .scale = 0.7,
      .feature_map = FeatureMap::elu}},
    // Hedgehog with separate W_q and W_k: a map that used one for both fails here.
    {"HedgehogUntiedGqa", Layout::NHD,
     {.q_heads = 4, .kv_heads = 2, .q_len = 40, .k_len = 56, .dim = 16, .block_k = 8, .topk = 0.4,
      .negligible = 0.2, .feature_map = FeatureMap::hedgehog, .tie_feature_weights = false}},
    {"HedgehogUntiedHeadDim24", Layout::HND,
     {.q_heads = 2, .kv_heads = 1, .q_len = 50, .k_len = 50, .dim = 24, .negligible = 0.25,
      .feature_map = FeatureMap::hedgehog, .tie_feature_weights = false}},
    {"HedgehogTiedSingleToken", Layout::HND, {.q_len = 1, .k_len = 1, .feature_map = FeatureMap::hedgehog}},
};

INSTANTIATE_TEST_SUITE_P(
    Shapes, ForwardEdgeShapes,
    ::testing::Combine(::testing::ValuesIn(kEdgeCases), ::testing::Values(LinearScope::marginal, LinearScope::all)),
    [](const ::testing::TestParamInfo<std::tuple<EdgeCase, LinearScope>>& info) {
      return std::get<0>(info.param).name + "_" + slattn::linear_scope_name(std::get<1>(info.param));
    });

// Projection weights stay float32 master weights with float64 inputs, and the
// linear branch still runs when only `out` is asked for.
TEST(ForwardOutputs, OnlyOutAndLseWithFloat32Projection) {
  const Problem p = ragged_problem(FeatureMap::elu, LinearScope::all);
  const Inputs<double> in = random_inputs(p, 31, DType::float64, true, true, DType::float32);
  RunOptions options;
  options.proj_dtype = DType::float32;
  options.branch_outputs = false;
  expect_matches_reference(p, in, options);
}

TEST(ForwardOutputs, WithoutLinearBranchOutIsTheSparseBranch) {
  const Problem p = ragged_problem(FeatureMap::softmax, LinearScope::all);
  const Inputs<double> in = random_inputs(p, 37, DType::float64, false, false);
  RunOptions options;
  options.branch_outputs = false;
  const ForwardRun run = run_forward(p, in, options);
  const Outputs<double> expected = reference_forward(p, run.block_map, in);
  EXPECT_TRUE(all_close(run.outputs.out, expected.out_sparse, kFloat64Tolerance));
}

// Plain softmax attention over every key, written without block maps. The
// logits are of order one here, so the exponentials need no max shift.
Outputs<double> dense_attention(const Problem& p, const Inputs<double>& in) {
  Outputs<double> result;
  result.out.assign(static_cast<size_t>(p.q_count()), 0.0);
  result.lse.assign(static_cast<size_t>(p.lse_count()), 0.0);
  for (int64_t bh = 0; bh < p.batch * p.q_heads; ++bh) {
    const int64_t kv_offset = ((bh / p.q_heads) * p.kv_heads + p.kv_head_of(bh % p.q_heads)) * p.k_len * p.dim;
    for (int64_t i = 0; i < p.q_len; ++i) {
      const double* q = in.q.data() + (bh * p.q_len + i) * p.dim;
      std::vector<double> logits(static_cast<size_t>(p.k_len));
      double total = 0.0;
      for (int64_t j = 0; j < p.k_len; ++j) {
        for (int64_t d = 0; d < p.dim; ++d) logits[j] += q[d] * in.k[kv_offset + j * p.dim + d];
        total += std::exp(logits[j] *= p.softmax_scale());
      }
      double* out = result.out.data() + (bh * p.q_len + i) * p.dim;
      for (int64_t j = 0; j < p.k_len; ++j)
        for (int64_t d = 0; d < p.dim; ++d) out[d] += std::exp(logits[j]) / total * in.v[kv_offset + j * p.dim + d];
      result.lse[bh * p.q_len + i] = std::log(total);
    }
  }
  return result;
}

TEST(ForwardDense, TopkOneEqualsDenseAttention) {
  const Problem p = {.q_heads = 4, .kv_heads = 2, .q_len = 45, .k_len = 70, .dim = 16, .topk = 1.0};
  const Inputs<double> in = random_inputs(p, 41, DType::float64, true, true, DType::float64);
  const ForwardRun run = run_forward(p, in, {});
  const Outputs<double> dense = dense_attention(p, in);
  EXPECT_TRUE(all_close(run.outputs.out_sparse, dense.out, kFloat64Tolerance)) << "out_sparse";
  EXPECT_TRUE(all_close(run.outputs.lse, dense.lse, kFloat64Tolerance)) << "lse";
  // Every block is critical, so the marginal set is empty: Ol is exactly zero
  // and out is dense attention plus the bias.
  for (const double value : run.outputs.out_linear) ASSERT_EQ(value, 0.0);
  std::vector<double> dense_plus_bias = dense.out;
  for (size_t e = 0; e < dense_plus_bias.size(); ++e) dense_plus_bias[e] += in.proj_bias[e % p.dim];
  EXPECT_TRUE(all_close(run.outputs.out, dense_plus_bias, kFloat64Tolerance)) << "out";
}

TEST(ForwardHandWrittenMap, RowsWithoutCriticalOrLinearBlocks) {
  // Mq = 3, Nk = 3: block 0 is ordinary, block 1 has no critical key block
  // (Os = 0, LSE = -inf), block 2 has only negligible ones (Os = Ol = 0).
  for (const LinearScope scope : {LinearScope::marginal, LinearScope::all}) {
    SCOPED_TRACE(slattn::linear_scope_name(scope));
    const Problem p = {.q_len = 40, .k_len = 36, .block_k = 12, .feature_map = FeatureMap::elu, .scope = scope};
    const std::vector<int8_t> map = {1, 0, -1, 0, 0, -1, -1, -1, -1};
    const Inputs<double> in = random_inputs(p, 43, DType::float64, true, true, DType::float64);
    RunOptions options;
    options.block_map = &map;
    expect_matches_reference(p, in, options);

    const ForwardRun run = run_forward(p, in, options);
    for (int64_t i = 16; i < 40; ++i) {
      EXPECT_EQ(run.outputs.lse[i], -std::numeric_limits<double>::infinity()) << "row " << i;
      for (int64_t d = 0; d < p.dim; ++d) {
        EXPECT_EQ(run.outputs.out_sparse[i * p.dim + d], 0.0);
        if (i >= 32) {
          EXPECT_EQ(run.outputs.out_linear[i * p.dim + d], 0.0);
        }
      }
    }
  }
}

TEST(ForwardNegligible, ScopeAllExcludesExactlyTheNegligibleBlocks) {
  // One query block, so a key block's class is the same for every query row:
  // 2 critical, 2 marginal and 4 negligible key blocks of 16 keys.
  const Problem p = {.q_len = 16, .k_len = 128, .dim = 16, .topk = 0.25, .negligible = 0.5, .scope = LinearScope::all};
  const Inputs<double> in = random_inputs(p, 47, DType::float64, true, true, DType::float64);
  const ForwardRun base = run_forward(p, in, {});
  int64_t negligible_block = -1, marginal_block = -1;
  for (int64_t n = 0; n < p.k_blocks(); ++n) {
    if (base.block_map[n] == slattn::kNegligible) negligible_block = n;
    if (base.block_map[n] == slattn::kMarginal) marginal_block = n;
  }
  ASSERT_GE(negligible_block, 0);
  ASSERT_GE(marginal_block, 0);

  // Changing V (which routing ignores) in a negligible block leaves out alone;
  // in a marginal block it moves out.
  auto out_after_changing_block = [&](int64_t n) {
    Inputs<double> changed = in;
    for (int64_t e = n * p.block_k * p.dim; e < (n + 1) * p.block_k * p.dim; ++e) changed.v[e] += 3.0;
    const ForwardRun run = run_forward(p, changed, {});
    EXPECT_EQ(run.block_map, base.block_map);
    return run.outputs.out;
  };
  EXPECT_TRUE(all_close(out_after_changing_block(negligible_block), base.outputs.out, 1e-12));
  EXPECT_FALSE(all_close(out_after_changing_block(marginal_block), base.outputs.out, 1e-3));
}

// Reduced precision: the library against the float64 reference, with the
// same reference computed in float (and rounded to the output dtype) as the
// baseline error.
void expect_within_baseline(const Problem& p, const Inputs<double>& in, const RunOptions& options, double noise) {
  const ForwardRun run = run_forward(p, in, options);
  const std::vector<int8_t> map = reference_block_map(p, in.q, in.k);
  ASSERT_EQ(run.block_map, map);
  const Outputs<double> reference = reference_forward(p, map, in);
  const Outputs<float> narrow = reference_forward(p, map, convert_inputs<float>(in));
  auto baseline = [&](const std::vector<float>& values) { return round_to(options.dtype, convert<double>(values)); };
  constexpr double kLseNoise = 1e-6;  // the LSE is float32 whatever the input dtype
  EXPECT_TRUE(within_baseline(run.outputs.out, baseline(narrow.out), reference.out, noise)) << "out";
  EXPECT_TRUE(within_baseline(run.outputs.out_sparse, baseline(narrow.out_sparse), reference.out_sparse, noise))
      << "out_sparse";
  EXPECT_TRUE(within_baseline(run.outputs.out_linear, baseline(narrow.out_linear), reference.out_linear, noise))
      << "out_linear";
  EXPECT_TRUE(within_baseline(run.outputs.lse, convert<double>(narrow.lse), reference.lse, kLseNoise)) << "lse";
}

using ReducedParam = std::tuple<DType, FeatureMap, LinearScope>;
class ForwardReducedPrecision : public ::testing::TestWithParam<ReducedParam> {};

TEST_P(ForwardReducedPrecision, WithinTwiceTheBaselineError) {
  const auto [dtype, map, scope] = GetParam();
  const Problem p = ragged_problem(map, scope);
  const Inputs<double> in = random_inputs(p, 53, dtype, true, true, DType::float32);
  RunOptions options;
  options.dtype = dtype;
  options.layout = Layout::NHD;
  options.proj_dtype = DType::float32;
  // Rounding noise: one unit in the last place at magnitude one.
  const double noise = dtype == DType::float32 ? 1e-6 : dtype == DType::bfloat16 ? 0x1p-8 : 0x1p-11;
  expect_within_baseline(p, in, options, noise);
}

std::string reduced_name(const ::testing::TestParamInfo<ReducedParam>& info) {
  const auto [dtype, map, scope] = info.param;
  return slattn::dtype_name(dtype) + "_" + slattn::feature_map_name(map) + "_" + slattn::linear_scope_name(scope);
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, ForwardReducedPrecision,
    ::testing::Combine(::testing::Values(DType::float32, DType::bfloat16, DType::float16),
                       ::testing::Values(FeatureMap::softmax, FeatureMap::elu, FeatureMap::relu,
                                         FeatureMap::hedgehog),
                       ::testing::Values(LinearScope::marginal, LinearScope::all)),
    reduced_name);

class ForwardStoreRounding : public ::testing::TestWithParam<DType> {};

// One key and a zero projection weight make out = v + bias exactly in fp32
// before the store, so each element must be the nearest 16-bit value (ties
// to even) of v + bias: the baseline rule above cannot tell rounding from
// truncation, whose errors are only twice as large.
TEST_P(ForwardStoreRounding, OutputIsRoundedToNearestEven) {
  const DType dtype = GetParam();
  const Problem p = {.q_heads = 2, .kv_heads = 1, .q_len = 32, .k_len = 1, .dim = 16, .topk = 1.0,
                     .scope = LinearScope::all};
  Inputs<double> in = random_inputs(p, 59, dtype, true, true, DType::float32);
  in.proj_weight.assign(in.proj_weight.size(), 0.0);
  // Odd features: a bias that puts v + bias exactly halfway between two
  // neighbours x and x + ulp, to check that ties go to even.
  const int significant_bits = dtype == DType::bfloat16 ? kBfloat16Bits : kFloat16Bits;
  const std::vector<double> anchors = round_to(dtype, random_normal(p.dim, 61));
  for (int64_t d = 1; d < p.dim; d += 2) {
    int exponent;
    std::frexp(anchors[d], &exponent);
    const double half_ulp = std::ldexp(1.0, exponent - significant_bits - 1);
    in.proj_bias[d] = anchors[d] + half_ulp - in.v[d];
    ASSERT_EQ(round_to(DType::float32, {in.proj_bias[d]})[0], in.proj_bias[d]) << "bias must be exact in fp32";
  }
  RunOptions options;
  options.dtype = dtype;
  options.proj_dtype = DType::float32;
  const ForwardRun run = run_forward(p, in, options);
  std::vector<double> expected(run.outputs.out.size());
  for (size_t e = 0; e < expected.size(); ++e) expected[e] = in.v[e % p.dim] + in.proj_bias[e % p.dim];
  EXPECT_EQ(run.outputs.out, round_to(dtype, expected));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ForwardStoreRounding, ::testing::Values(DType::bfloat16, DType::float16),
                         [](const ::testing::TestParamInfo<DType>& info) { return slattn::dtype_name(info.param); });

}  // namespace
}  // namespace slattn_test
