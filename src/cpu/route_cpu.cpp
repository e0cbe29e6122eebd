// Pooled router of SLA on the CPU (SPEC section 1). Block means and scores are
// accumulated in double, wider than the fp32 the spec asks for.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/scalar.h"
#include "cpu/sla_cpu.h"
#include "cpu/thread_pool.h"

namespace slattn::cpu {
namespace {

// Mean of the rows of each block of `x` (rows, D), minus `shift` (D) if given.
std::vector<double> block_means(const Matrix<double>& x, int64_t block, const std::vector<double>* shift) {
  const int64_t blocks = (x.rows + block - 1) / block;
  std::vector<double> means(static_cast<size_t>(blocks * x.cols), 0.0);
  for (int64_t n = 0; n < blocks; ++n) {
    double* mean = means.data() + n * x.cols;
    const int64_t begin = n * block;
    const int64_t end = std::min(x.rows, begin + block);
    for (int64_t r = begin; r < end; ++r) axpy(1.0, x.row(r), mean, x.cols);
    for (int64_t c = 0; c < x.cols; ++c) {
      mean[c] /= static_cast<double>(end - begin);
      if (shift) mean[c] -= (*shift)[c];
    }
  }
  return means;
}

// Ranks a row's key blocks: higher score first, ties to the lower index; a NaN
// score ranks last so that the order stays a strict weak ordering.
std::vector<int64_t> rank_blocks(const double* scores, int64_t count) {
  auto key = [&](int64_t n) { return std::isnan(scores[n]) ? -std::numeric_limits<double>::infinity() : scores[n]; };
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
  return order;
}

void route_head(const RouteParams& p, const RoutingPlanView& plan, int64_t b, int64_t h) {
  const PlanShape& shape = plan.shape;
  const int64_t kv_head = h / (p.q.heads() / p.k.heads());
  const Matrix<double> q = load_head<double>(p.q, b, h);
  const Matrix<double> k = load_head<double>(p.k, b, kv_head);
  const int64_t dim = q.cols;

  // K~ = K - mean over rows of K; the block mean of K~ is the block mean of K minus it.
  std::vector<double> k_mean(static_cast<size_t>(dim), 0.0);
  for (int64_t r = 0; r < k.rows; ++r) axpy(1.0, k.row(r), k_mean.data(), dim);
  for (auto& value : k_mean) value /= static_cast<double>(k.rows);
  const std::vector<double> q_pooled = block_means(q, shape.block_q, nullptr);
  const std::vector<double> k_pooled = block_means(k, shape.block_k, &k_mean);

  const int64_t q_blocks = shape.q_blocks();
  const int64_t k_blocks = shape.k_blocks();
  const int64_t n_crit = critical_blocks_per_row(p.topk, k_blocks);
  const int64_t n_negl = negligible_blocks_per_row(p.topk, p.negligible, k_blocks);
  std::vector<double> scores(static_cast<size_t>(k_blocks));
  int8_t* map = plan.block_map + (b * shape.heads + h) * q_blocks * k_blocks;
  for (int64_t m = 0; m < q_blocks; ++m) {
    for (int64_t n = 0; n < k_blocks; ++n) scores[n] = dot(q_pooled.data() + m * dim, k_pooled.data() + n * dim, dim);
    const std::vector<int64_t> order = rank_blocks(scores.data(), k_blocks);
    int8_t* row = map + m * k_blocks;
    for (int64_t rank = 0; rank < k_blocks; ++rank) {
      const bool critical = rank < n_crit;
      const bool negligible = rank >= k_blocks - n_negl;
      row[order[rank]] = critical ? kCritical : negligible ? kNegligible : kMarginal;
    }
  }
}

}  // namespace

void route(const RouteParams& params, const RoutingPlanView& plan) {
  const int64_t heads = plan.shape.heads;
  default_pool()->parallel_for(plan.shape.batch * heads, [&](int64_t task) {
    route_head(params, plan, task / heads, task % heads);
  });
}

}  // namespace slattn::cpu
