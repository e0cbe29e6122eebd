// sla_backward on the CPU (SPEC section 5) against central finite differences
// of the naive float64 forward, on tiny ragged shapes with a fixed block map.
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.h"

namespace slattn_test {
namespace {

using slattn::FeatureMap;
using slattn::LinearScope;

// Finite differences carry ~1e-9 relative error (see reference_gradients);
// a wrong term in the backward shows up at 1e-2 or more.
constexpr double kGradientTolerance = 1e-6;

// Incoming gradients; empty extras mean "not given".
struct Upstream {
  std::vector<double> dout, dout_sparse, dout_linear;
};

// Runs the library's backward with the forward state (Os, LSE) of the naive
// reference, so a forward bug cannot leak into these tests. Gradients start
// as NaN so that an element the library skips cannot pass.
Gradients run_backward(const Problem& p, const std::vector<int8_t>& map, const Inputs<double>& in,
                       const Upstream& up, Layout layout) {
  const Outputs<double> forward = reference_forward(p, map, in);
  const std::vector<double> nan_q(static_cast<size_t>(p.q_count()), std::numeric_limits<double>::quiet_NaN());
  const std::vector<double> nan_kv(static_cast<size_t>(p.kv_count()), nan_q[0]);
  const DType f64 = DType::float64;
  HostTensor q(in.q, f64, q_size(p), layout), k(in.k, f64, kv_size(p), layout), v(in.v, f64, kv_size(p), layout);
  HostTensor out_sparse(forward.out_sparse, f64, q_size(p), layout);
  Buffer lse(f64, forward.lse);
  HostTensor dout(up.dout, f64, q_size(p), layout);
  HostTensor dout_sparse(up.dout_sparse.empty() ? nan_q : up.dout_sparse, f64, q_size(p), layout);
  HostTensor dout_linear(up.dout_linear.empty() ? nan_q : up.dout_linear, f64, q_size(p), layout);
  HostTensor dq(nan_q, f64, q_size(p), layout);
  HostTensor dk(nan_kv, f64, kv_size(p), layout), dv(nan_kv, f64, kv_size(p), layout);
  Buffer weight(f64, in.proj_weight);
  Buffer d_weight(f64, std::vector<double>(in.proj_weight.size(), nan_q[0]));
  Buffer d_bias(f64, std::vector<double>(in.proj_bias.size(), nan_q[0]));
  FeatureWeightStorage feature_weights(in, f64);
  Buffer d_feature_q(f64, std::vector<double>(in.feature_weight_q.size(), nan_q[0]));
  Buffer d_feature_k(f64, std::vector<double>(in.feature_weight_k.size(), nan_q[0]));

  PlanStorage plan(plan_shape(p));
  plan.block_map = map;
  slattn::build_block_lists(plan.view());
  slattn::SlaBackwardParams params;
  params.q = q.view();
  params.k = k.view();
  params.v = v.view();
  params.out_sparse = out_sparse.view();
  params.lse = lse.data();
  params.proj_dtype = f64;
  if (!in.proj_weight.empty()) {
    params.proj_weight = weight.data();
    params.d_proj_weight = d_weight.data();
  }
  if (!in.proj_bias.empty()) {
    params.has_proj_bias = true;
    params.d_proj_bias = d_bias.data();
  }
  params.dout = dout.view();
  if (!up.dout_sparse.empty()) params.dout_sparse = dout_sparse.view();
  if (!up.dout_linear.empty()) params.dout_linear = dout_linear.view();
  params.dq = dq.view();
  params.dk = dk.view();
  params.dv = dv.view();
  params.scale = p.softmax_scale();
  params.feature_map = p.feature_map;
  params.feature_weights = feature_weights.view();
  if (!in.feature_weight_q.empty()) {
    // Tied (no W_k): the one gradient goes to one buffer, passed twice.
    params.d_feature_weight_q = d_feature_q.data();
    params.d_feature_weight_k = in.feature_weight_k.empty() ? d_feature_q.data() : d_feature_k.data();
  }
  params.linear_scope = p.scope;
  slattn::sla_backward(params, plan.view());
  return {dq.values(),     dk.values(),          dv.values(),         d_weight.values(),
          d_bias.values(), d_feature_q.values(), d_feature_k.values()};
}

void expect_gradients_match(const Problem& p, const std::vector<int8_t>& map, const Inputs<double>& in,
                            const Upstream& up, Layout layout = Layout::HND) {
  const Gradients actual = run_backward(p, map, in, up, layout);
  const Gradients expected = reference_gradients(p, map, in, up.dout, up.dout_sparse, up.dout_linear);
  EXPECT_TRUE(all_close(actual.dq, expected.dq, kGradientTolerance)) << "dq";
  EXPECT_TRUE(all_close(actual.dk, expected.dk, kGradientTolerance)) << "dk";
  EXPECT_TRUE(all_close(actual.dv, expected.dv, kGradientTolerance)) << "dv";
  EXPECT_TRUE(all_close(actual.d_proj_weight, expected.d_proj_weight, kGradientTolerance)) << "d_proj_weight";
  EXPECT_TRUE(all_close(actual.d_proj_bias, expected.d_proj_bias, kGradientTolerance)) << "d_proj_bias";
  EXPECT_EQ(actual.d_feature_weight_q.size(), in.feature_weight_q.size());
  EXPECT_EQ(actual.d_feature_weight_k.size(), in.feature_weight_k.size());
  EXPECT_TRUE(all_close(actual.d_feature_weight_q, expected.d_feature_weight_q, kGradientTolerance))
      << "d_feature_weight_q";
  EXPECT_TRUE(all_close(actual.d_feature_weight_k, expected.d_feature_weight_k, kGradientTolerance))
      << "d_feature_weight_k";
}

// Mq = 3 and Nk = 5, both with a partial last block: per row 2 critical,
// 2 marginal and 1 negligible key block.
Problem ragged_problem(FeatureMap map, LinearScope scope, int64_t q_heads = 2, int64_t kv_heads = 2) {
  return {.q_heads = q_heads, .kv_heads = kv_heads, .q_len = 21, .k_len = 19, .block_q = 8, .block_k = 4,
          .topk = 0.4, .negligible = 0.2, .feature_map = map, .scope = scope};
}

Upstream random_upstream(const Problem& p, uint64_t seed, bool extras) {
  Upstream up{random_normal(p.q_count(), seed), {}, {}};
  if (extras) {
    up.dout_sparse = random_normal(p.q_count(), seed + 1);
    up.dout_linear = random_normal(p.q_count(), seed + 2);
  }
  return up;
}

using BackwardParam = std::tuple<FeatureMap, LinearScope, Layout>;
class BackwardFloat64 : public ::testing::TestWithParam<BackwardParam> {};

TEST_P(BackwardFloat64, MatchesFiniteDifferencesWithProjection) {
  const auto [map_kind, scope, layout] = GetParam();
  const Problem p = ragged_problem(map_kind, scope);
  const Inputs<double> in = random_inputs(p, 61, DType::float64, true, true, DType::float64);
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 67, false), layout);
}

std::string backward_name(const ::testing::TestParamInfo<BackwardParam>& info) {
  const auto [map, scope, layout] = info.param;
  return slattn::feature_map_name(map) + "_" + slattn::linear_scope_name(scope) +
         (layout == Layout::HND ? "_HND" : "_NHD");
}

INSTANTIATE_TEST_SUITE_P(
    AllOptions, BackwardFloat64,
    ::testing::Combine(::testing::Values(FeatureMap::softmax, FeatureMap::elu, FeatureMap::relu,
                                         FeatureMap::hedgehog),
                       ::testing::Values(LinearScope::marginal, LinearScope::all),
                       ::testing::Values(Layout::HND, Layout::NHD)),
    backward_name);

// Hedgehog's W_q and W_k, tied (one W, gradient through both uses) and
// untied, with GQA so that W_k's gradient sums over the query heads' keys.
class BackwardHedgehog : public ::testing::TestWithParam<std::tuple<bool, LinearScope>> {};

TEST_P(BackwardHedgehog, FeatureWeightGradientsMatchFiniteDifferences) {
  const auto [tied, scope] = GetParam();
  Problem p = ragged_problem(FeatureMap::hedgehog, scope, 4, 2);
  p.tie_feature_weights = tied;
  const Inputs<double> in = random_inputs(p, 131, DType::float64, true, true, DType::float64);
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 137, true), Layout::NHD);
}

INSTANTIATE_TEST_SUITE_P(TiedAndUntied, BackwardHedgehog,
                         ::testing::Combine(::testing::Bool(),
                                            ::testing::Values(LinearScope::marginal, LinearScope::all)),
                         [](const ::testing::TestParamInfo<std::tuple<bool, LinearScope>>& info) {
                           return std::string(std::get<0>(info.param) ? "Tied_" : "Untied_") +
                                  slattn::linear_scope_name(std::get<1>(info.param));
                         });

// Without the linear branch the feature weights get no gradient: written as zeros.
TEST(BackwardHedgehogSparseOnly, FeatureWeightGradientsAreZero) {
  Problem p = ragged_problem(FeatureMap::hedgehog, LinearScope::marginal);
  p.tie_feature_weights = false;
  const Inputs<double> in = random_inputs(p, 139, DType::float64, false, false);
  const Gradients actual =
      run_backward(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 149, false), Layout::HND);
  EXPECT_EQ(actual.d_feature_weight_q, std::vector<double>(in.feature_weight_q.size(), 0.0));
  EXPECT_EQ(actual.d_feature_weight_k, std::vector<double>(in.feature_weight_k.size(), 0.0));
}

// dOs = dout + dout_sparse and dOl = dout · W + dout_linear.
class BackwardExtraGradients : public ::testing::TestWithParam<std::tuple<FeatureMap, LinearScope>> {};

TEST_P(BackwardExtraGradients, OnBothBranchOutputs) {
  const auto [map_kind, scope] = GetParam();
  const Problem p = ragged_problem(map_kind, scope);
  const Inputs<double> in = random_inputs(p, 71, DType::float64, true, true, DType::float64);
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 73, true));
}

INSTANTIATE_TEST_SUITE_P(Options, BackwardExtraGradients,
                         ::testing::Values(std::tuple{FeatureMap::softmax, LinearScope::all},
                                           std::tuple{FeatureMap::relu, LinearScope::marginal}),
                         [](const ::testing::TestParamInfo<std::tuple<FeatureMap, LinearScope>>& info) {
                           return slattn::feature_map_name(std::get<0>(info.param)) + "_" +
                                  slattn::linear_scope_name(std::get<1>(info.param));
                         });

TEST(BackwardBranches, LinearBranchDrivenOnlyByDoutLinear) {
  const Problem p = ragged_problem(FeatureMap::elu, LinearScope::all);
  const Inputs<double> in = random_inputs(p, 79, DType::float64, false, false);
  Upstream up = random_upstream(p, 83, true);
  up.dout_sparse.clear();
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, up);
}

TEST(BackwardBranches, SparseOnlyWithoutProjection) {
  const Problem p = ragged_problem(FeatureMap::softmax, LinearScope::marginal);
  const Inputs<double> in = random_inputs(p, 89, DType::float64, false, false);
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 97, false));
}

// dk and dv sum over the query heads that share a key/value head.
class BackwardGqa : public ::testing::TestWithParam<int64_t> {};

TEST_P(BackwardGqa, SumsOverQueryHeadsOfAGroup) {
  const Problem p = ragged_problem(FeatureMap::elu, LinearScope::marginal, 4, GetParam());
  const Inputs<double> in = random_inputs(p, 101, DType::float64, true, true, DType::float64);
  expect_gradients_match(p, reference_block_map(p, in.q, in.k), in, random_upstream(p, 103, true), Layout::NHD);
}

INSTANTIATE_TEST_SUITE_P(KeyValueHeads, BackwardGqa, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int64_t>& info) {
                           return "Hq4_Hkv" + std::to_string(info.param);
                         });

TEST(BackwardHandWrittenMap, RowsWithoutCriticalOrLinearBlocks) {
  // Query block 1 has no critical key block (LSE = -inf), block 2 nothing at
  // all: their gradients must stay finite and match.
  for (const LinearScope scope : {LinearScope::marginal, LinearScope::all}) {
    SCOPED_TRACE(slattn::linear_scope_name(scope));
    const Problem p = ragged_problem(FeatureMap::softmax, scope, 1, 1);
    const std::vector<int8_t> map = {1, 0, -1, 0, 1,  0, 0, -1, 0, 0,  -1, -1, -1, -1, -1};
    const Inputs<double> in = random_inputs(p, 107, DType::float64, true, true, DType::float64);
    expect_gradients_match(p, map, in, random_upstream(p, 109, true));
  }
}

// Each task sums its share of d_proj_weight / d_proj_bias and the shares are
// reduced in task order, so the thread count must not change a single bit.
// The backward of p on one thread and on three (the thread count restored after).
std::pair<Gradients, Gradients> serial_and_parallel(const Problem& p, uint64_t input_seed, uint64_t upstream_seed,
                                                    bool dout_linear) {
  const Inputs<double> in = random_inputs(p, input_seed, DType::float64, true, true, DType::float64);
  const std::vector<int8_t> map = reference_block_map(p, in.q, in.k);
  const Upstream up = random_upstream(p, upstream_seed, dout_linear);
  const int threads_before = slattn::num_threads();
  slattn::set_num_threads(1);
  Gradients serial = run_backward(p, map, in, up, Layout::HND);
  slattn::set_num_threads(3);
  Gradients parallel = run_backward(p, map, in, up, Layout::HND);
  slattn::set_num_threads(threads_before);
  return {std::move(serial), std::move(parallel)};
}

TEST(BackwardThreads, ResultsDoNotDependOnTheThreadCount) {
  Problem p = ragged_problem(FeatureMap::softmax, LinearScope::all, 4, 2);
  p.batch = 2;
  const auto [serial, parallel] = serial_and_parallel(p, 113, 127, true);
  EXPECT_EQ(serial.dq, parallel.dq);
  EXPECT_EQ(serial.dk, parallel.dk);
  EXPECT_EQ(serial.dv, parallel.dv);
  EXPECT_EQ(serial.d_proj_weight, parallel.d_proj_weight);
  EXPECT_EQ(serial.d_proj_bias, parallel.d_proj_bias);
}

TEST(BackwardThreads, HedgehogWeightGradientsDoNotDependOnTheThreadCount) {
  Problem p = ragged_problem(FeatureMap::hedgehog, LinearScope::all, 4, 2);
  p.batch = 2;
  p.tie_feature_weights = false;
  const auto [serial, parallel] = serial_and_parallel(p, 151, 157, false);
  EXPECT_EQ(serial.d_feature_weight_q, parallel.d_feature_weight_q);
  EXPECT_EQ(serial.d_feature_weight_k, parallel.d_feature_weight_k);
}

}  // namespace
}  // namespace slattn_test
