// Routing (SPEC section 1): the pooled router against the naive one, the
// row/column block lists, class ordering, tie-breaking and GQA head mapping.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "test_util.h"

namespace slattn_test {
namespace {

using slattn::kCritical;

// Row lists: the critical blocks of each query block, ascending, then -1;
// column lists: the query blocks that chose each key block, ascending, then -1.
void expect_lists_match_map(const PlanStorage& plan) {
  const int64_t mq = plan.shape.q_blocks(), nk = plan.shape.k_blocks();
  for (int64_t pair = 0; pair < plan.shape.batch * plan.shape.heads; ++pair) {
    const int8_t* map = plan.block_map.data() + pair * mq * nk;
    for (int64_t m = 0; m < mq; ++m) {
      std::vector<int32_t> expected;
      for (int64_t n = 0; n < nk; ++n)
        if (map[m * nk + n] == kCritical) expected.push_back(static_cast<int32_t>(n));
      expected.resize(static_cast<size_t>(nk), -1);
      const int32_t* row = plan.row_index.data() + (pair * mq + m) * nk;
      EXPECT_EQ(std::vector<int32_t>(row, row + nk), expected) << "row list of pair " << pair << ", block " << m;
      EXPECT_EQ(plan.row_count[static_cast<size_t>(pair * mq + m)],
                static_cast<int32_t>(std::count(map + m * nk, map + (m + 1) * nk, kCritical)));
    }
    for (int64_t n = 0; n < nk; ++n) {
      std::vector<int32_t> expected;
      for (int64_t m = 0; m < mq; ++m)
        if (map[m * nk + n] == kCritical) expected.push_back(static_cast<int32_t>(m));
      const auto count = static_cast<int32_t>(expected.size());
      expected.resize(static_cast<size_t>(mq), -1);
      const int32_t* col = plan.col_index.data() + (pair * nk + n) * mq;
      EXPECT_EQ(std::vector<int32_t>(col, col + mq), expected) << "column list of pair " << pair << ", block " << n;
      EXPECT_EQ(plan.col_count[static_cast<size_t>(pair * nk + n)], count);
    }
  }
}

TEST(RouteCounts, FollowTheSpecFormulas) {
  // Hand-computed: floor, the clamp to [1, Nk], and negligible capped by Nk - n_crit.
  EXPECT_EQ(slattn::critical_blocks_per_row(0.01, 10), 1);
  EXPECT_EQ(slattn::critical_blocks_per_row(0.3, 10), 3);
  EXPECT_EQ(slattn::critical_blocks_per_row(0.99, 10), 9);
  EXPECT_EQ(slattn::critical_blocks_per_row(1.0, 7), 7);
  EXPECT_EQ(slattn::negligible_blocks_per_row(0.75, 0.25, 4), 1);
  EXPECT_EQ(slattn::negligible_blocks_per_row(0.1, 0.9, 5), 4);
  EXPECT_EQ(slattn::negligible_blocks_per_row(0.5, 0.0, 8), 0);
  for (const int64_t nk : {1, 2, 3, 7, 16, 33}) {
    for (const double topk : {0.05, 0.2, 0.5, 0.8, 1.0}) {
      for (const double negligible : {0.0, 0.1, 0.3}) {
        if (topk + negligible > 1.0) continue;
        EXPECT_EQ(slattn::critical_blocks_per_row(topk, nk), reference_critical_count(topk, nk));
        EXPECT_EQ(slattn::negligible_blocks_per_row(topk, negligible, nk),
                  reference_negligible_count(topk, negligible, nk));
      }
    }
  }
}

struct RouteCase {
  std::string name;
  Problem problem;
};

class RouteMatchesReference : public ::testing::TestWithParam<RouteCase> {};

TEST_P(RouteMatchesReference, InBothLayouts) {
  const Problem& p = GetParam().problem;
  const Inputs<double> in = random_inputs(p, 101, DType::float64, false, false);
  const std::vector<int8_t> expected = reference_block_map(p, in.q, in.k);
  for (const Layout layout : {Layout::HND, Layout::NHD}) {
    SCOPED_TRACE(layout == Layout::HND ? "HND" : "NHD");
    HostTensor q(in.q, DType::float64, q_size(p), layout), k(in.k, DType::float64, kv_size(p), layout);
    const PlanStorage plan = route_plan(p, q.view(), k.view());
    EXPECT_EQ(plan.block_map, expected);
    expect_lists_match_map(plan);
  }
}

const RouteCase kRouteCases[] = {
    {"Ragged", {.batch = 2, .q_heads = 2, .kv_heads = 2, .q_len = 70, .k_len = 53, .topk = 0.3}},
    {"SingleToken", {.q_len = 1, .k_len = 1}},
    {"SingleBlock", {.q_heads = 2, .kv_heads = 2, .q_len = 16, .k_len = 16}},
    {"UnequalBlocks", {.q_heads = 2, .q_len = 45, .k_len = 97, .block_q = 8, .topk = 0.25, .negligible = 0.25}},
    {"Negligible", {.batch = 2, .q_len = 64, .k_len = 128, .block_k = 8, .topk = 0.2, .negligible = 0.5}},
    {"Dense", {.q_heads = 2, .kv_heads = 2, .q_len = 40, .k_len = 40, .topk = 1.0}},
    {"GqaFourOverTwo", {.q_heads = 4, .kv_heads = 2, .q_len = 48, .k_len = 80, .topk = 0.4, .negligible = 0.2}},
    {"GqaFourOverOne", {.batch = 2, .q_heads = 4, .kv_heads = 1, .q_len = 33, .k_len = 64, .block_k = 8, .topk = 0.3}},
};

INSTANTIATE_TEST_SUITE_P(Shapes, RouteMatchesReference, ::testing::ValuesIn(kRouteCases),
                         [](const ::testing::TestParamInfo<RouteCase>& info) { return info.param.name; });

TEST(BuildBlockLists, FromAHandWrittenMap) {
  slattn::PlanShape shape;
  shape.batch = 1;
  shape.heads = 2;
  shape.q_len = 30;  // Mq = 3 with block 10
  shape.k_len = 40;  // Nk = 4 with block 10
  shape.block_q = 10;
  shape.block_k = 10;
  PlanStorage plan(shape);
  plan.block_map = {1, 0, 1, -1,   // head 0
                    0, 0, 0, 0,
                    -1, 1, 1, 1,
                    1, 1, 1, 1,    // head 1
                    0, -1, 0, 1,
                    1, 0, 0, 0};
  // Stale contents must be overwritten, padding included.
  std::fill(plan.row_index.begin(), plan.row_index.end(), 77);
  std::fill(plan.col_index.begin(), plan.col_index.end(), 77);
  slattn::build_block_lists(plan.view());
  EXPECT_EQ(plan.row_count, (std::vector<int32_t>{2, 0, 3, 4, 1, 1}));
  EXPECT_EQ(plan.row_index, (std::vector<int32_t>{0, 2, -1, -1,  -1, -1, -1, -1,  1, 2, 3, -1,
                                                  0, 1, 2, 3,    3, -1, -1, -1,   0, -1, -1, -1}));
  EXPECT_EQ(plan.col_count, (std::vector<int32_t>{1, 1, 2, 1, 2, 1, 1, 2}));
  EXPECT_EQ(plan.col_index, (std::vector<int32_t>{0, -1, -1,  2, -1, -1,  0, 2, -1,  2, -1, -1,
                                                  0, 2, -1,   0, -1, -1,  0, -1, -1,  0, 1, -1}));
}

TEST(RouteClasses, NegligibleBlocksHaveTheLowestScores) {
  // Nk = 8: 2 critical, 2 marginal, 4 negligible per row.
  const Problem p = {
      .batch = 2, .q_heads = 2, .kv_heads = 2, .q_len = 64, .k_len = 128, .topk = 0.25, .negligible = 0.5};
  const Inputs<double> in = random_inputs(p, 202, DType::float64, false, false);
  HostTensor q(in.q, DType::float64, q_size(p), Layout::HND), k(in.k, DType::float64, kv_size(p), Layout::HND);
  const PlanStorage plan = route_plan(p, q.view(), k.view());
  const std::vector<double> scores = reference_block_scores(p, in.q, in.k);
  const int64_t nk = p.k_blocks();
  for (size_t row = 0; row < scores.size(); row += static_cast<size_t>(nk)) {
    // Lowest critical score >= highest marginal; lowest marginal >= highest negligible.
    std::vector<double> lowest(3, 1e300), highest(3, -1e300);
    std::vector<int> count(3, 0);
    for (size_t n = 0; n < static_cast<size_t>(nk); ++n) {
      const int slot = plan.block_map[row + n] + 1;  // -1, 0, 1 -> 0, 1, 2
      lowest[slot] = std::min(lowest[slot], scores[row + n]);
      highest[slot] = std::max(highest[slot], scores[row + n]);
      ++count[slot];
    }
    EXPECT_EQ(count, (std::vector<int>{4, 2, 2})) << "row " << row / nk;
    EXPECT_GE(lowest[2], highest[1]) << "row " << row / nk;
    EXPECT_GE(lowest[1], highest[0]) << "row " << row / nk;
  }
}

// One query block whose rows are all e0, and four key blocks of two identical
// rows each whose first feature is given: the block scores are exactly those
// values (their mean is 0, so smoothing leaves them unchanged).
std::vector<int8_t> route_first_feature(const std::vector<double>& block_values, double topk, double negligible) {
  const Problem p = {.q_len = 4, .k_len = 2 * static_cast<int64_t>(block_values.size()), .block_q = 4, .block_k = 2,
                     .topk = topk, .negligible = negligible};
  std::vector<double> q(static_cast<size_t>(p.q_count()), 0.0), k(static_cast<size_t>(p.kv_count()), 0.0);
  for (int64_t i = 0; i < p.q_len; ++i) q[static_cast<size_t>(i * p.dim)] = 1.0;
  for (int64_t j = 0; j < p.k_len; ++j) k[static_cast<size_t>(j * p.dim)] = block_values[static_cast<size_t>(j / 2)];
  HostTensor q_tensor(q, DType::float64, q_size(p), Layout::HND), k_tensor(k, DType::float64, kv_size(p), Layout::HND);
  return route_plan(p, q_tensor.view(), k_tensor.view()).block_map;
}

TEST(RouteTies, GoToTheLowerBlockIndex) {
  // Blocks 1 and 3 tie for the second critical place: block 1 wins it.
  EXPECT_EQ(route_first_feature({3, 1, -5, 1}, 0.5, 0.25), (std::vector<int8_t>{1, 1, -1, 0}));
  // Blocks 1 and 3 tie for the lowest score: block 3 ranks last and is skipped.
  EXPECT_EQ(route_first_feature({3, -2, 1, -2}, 0.25, 0.25), (std::vector<int8_t>{1, 0, 0, -1}));
}

TEST(RouteTies, IdenticalKeyBlocksKeepTheFirstOnes) {
  // Every key block is the same random block: all scores tie exactly.
  // Nk = 6: 2 critical, 2 marginal, 2 negligible per row.
  const Problem p = {.q_heads = 2, .kv_heads = 2, .q_len = 32, .k_len = 96, .topk = 0.34, .negligible = 0.34};
  const std::vector<double> block = random_normal(p.block_k * p.dim, 303);
  std::vector<double> k;
  for (int64_t copy = 0; copy < p.kv_heads * p.k_blocks(); ++copy) k.insert(k.end(), block.begin(), block.end());
  HostTensor q(random_normal(p.q_count(), 304), DType::float64, q_size(p), Layout::HND);
  HostTensor k_tensor(k, DType::float64, kv_size(p), Layout::HND);
  const PlanStorage plan = route_plan(p, q.view(), k_tensor.view());
  for (size_t row = 0; row < plan.block_map.size(); row += 6)
    EXPECT_EQ(std::vector<int8_t>(plan.block_map.begin() + row, plan.block_map.begin() + row + 6),
              (std::vector<int8_t>{1, 1, 0, 0, -1, -1}));
}

TEST(RouteGqa, EachQueryHeadUsesItsOwnKeyHead) {
  const Problem p = {.q_heads = 4, .kv_heads = 2, .q_len = 64, .k_len = 128, .topk = 0.25, .negligible = 0.25};
  const Inputs<double> in = random_inputs(p, 404, DType::float64, false, false);
  HostTensor q(in.q, DType::float64, q_size(p), Layout::HND), k(in.k, DType::float64, kv_size(p), Layout::HND);
  const PlanStorage plan = route_plan(p, q.view(), k.view());
  EXPECT_EQ(plan.block_map, reference_block_map(p, in.q, in.k));

  // The check discriminates: pairing query head h with key head h % Hkv
  // instead would give another map (computed as MHA over the regrouped K).
  Problem per_head = p;
  per_head.kv_heads = p.q_heads;
  const int64_t head_size = p.k_len * p.dim;
  std::vector<double> regrouped;
  for (int64_t h = 0; h < p.q_heads; ++h) {
    const auto first = in.k.begin() + (h % p.kv_heads) * head_size;
    regrouped.insert(regrouped.end(), first, first + head_size);
  }
  EXPECT_NE(plan.block_map, reference_block_map(per_head, in.q, regrouped));
}

}  // namespace
}  // namespace slattn_test
