// Pooled router of SLA on the CPU (SPEC section 1), with the arithmetic of
// route_math.h so that its choices match the CUDA router's bit for bit.
#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/scalar.h"
#include "cpu/sla_cpu.h"
#include "cpu/thread_pool.h"
#include "route_math.h"

namespace slattn::cpu {
namespace {

namespace rm = route_math;

// Sums of the rows of each block of the (b, h) slice of x: (blocks, D), in double.
std::vector<double> block_sums(const TensorView& x, int64_t b, int64_t h, int64_t block) {
  const int64_t length = x.length();
  const int64_t dim = x.head_dim();
  const int64_t blocks = (length + block - 1) / block;
  std::vector<double> sums(static_cast<size_t>(blocks * dim), 0.0);
  for (int64_t n = 0; n < blocks; ++n) {
    for (int64_t r = n * block; r < std::min(length, (n + 1) * block); ++r) {
      const int64_t base = x.offset(b, h, r, 0);
      for (int64_t c = 0; c < dim; ++c)
        sums[n * dim + c] = rm::add(sums[n * dim + c], load_scalar<double>(x.data, base + c * x.stride[kHeadDim], x.dtype));
    }
  }
  return sums;
}

void route_head(const RouteParams& p, const RoutingPlanView& plan, int64_t b, int64_t h) {
  const PlanShape& shape = plan.shape;
  const int64_t kv_head = h / (p.q.heads() / p.k.heads());
  const int64_t dim = p.q.head_dim();
  const int64_t q_blocks = shape.q_blocks();
  const int64_t k_blocks = shape.k_blocks();

  std::vector<double> q_mean = block_sums(p.q, b, h, shape.block_q);
  for (int64_t m = 0; m < q_blocks; ++m) {
    const auto count = static_cast<double>(std::min(shape.q_len, (m + 1) * shape.block_q) - m * shape.block_q);
    for (int64_t c = 0; c < dim; ++c) q_mean[m * dim + c] = rm::div(q_mean[m * dim + c], count);
  }
  const std::vector<double> k_sums = block_sums(p.k, b, kv_head, shape.block_k);
  std::vector<double> k_mean(static_cast<size_t>(dim), 0.0);  // K~ = K - k_mean
  for (int64_t c = 0; c < dim; ++c) {
    for (int64_t n = 0; n < k_blocks; ++n) k_mean[c] = rm::add(k_mean[c], k_sums[n * dim + c]);
    k_mean[c] = rm::div(k_mean[c], static_cast<double>(shape.k_len));
  }

  const int64_t n_crit = critical_blocks_per_row(p.topk, k_blocks);
  const int64_t n_negl = negligible_blocks_per_row(p.topk, p.negligible, k_blocks);
  std::vector<double> keys(static_cast<size_t>(k_blocks));
  std::vector<int64_t> order(static_cast<size_t>(k_blocks));
  int8_t* map = plan.block_map + (b * shape.heads + h) * q_blocks * k_blocks;
  for (int64_t m = 0; m < q_blocks; ++m) {
    for (int64_t n = 0; n < k_blocks; ++n) {
      const int64_t count = std::min(shape.k_len, (n + 1) * shape.block_k) - n * shape.block_k;
      keys[n] = rm::rank_key(rm::block_score(&q_mean[m * dim], &k_sums[n * dim], k_mean.data(), count, dim));
    }
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return rm::outranks(keys[a], a, keys[c], c); });
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
