// Forward of SLA on the CPU: one task per (batch, query head).
#include <vector>

#include "cpu/linear_branch.h"
#include "cpu/sla_cpu.h"
#include "cpu/sparse_branch.h"
#include "cpu/sparse_quantized.h"
#include "cpu/thread_pool.h"

namespace slattn::cpu {
namespace {

// out = os + ol · Wᵀ + b, row by row (W is (D, D) as (out, in)).
template <typename T>
Matrix<T> combine(const SlaForwardParams& p, const Matrix<T>& os, const Matrix<T>& ol) {
  Matrix<T> out = os;
  if (p.proj_weight == nullptr) return out;
  const int64_t dim = os.cols;
  const std::vector<T> w = load_vector<T>(p.proj_weight, dim * dim, p.proj_dtype);
  const std::vector<T> bias = p.proj_bias ? load_vector<T>(p.proj_bias, dim, p.proj_dtype) : std::vector<T>(dim, T(0));
  for (int64_t i = 0; i < out.rows; ++i) {
    T* o = out.row(i);
    for (int64_t r = 0; r < dim; ++r) o[r] += dot(w.data() + r * dim, ol.row(i), dim) + bias[r];
  }
  return out;
}

template <typename T>
void forward_head(const SlaForwardParams& p, const RoutingPlanView& plan, int64_t b, int64_t h) {
  const int64_t kv_head = h / (p.q.heads() / p.k.heads());
  const HeadPlan head_plan = HeadPlan::of(plan, b, h);
  const Matrix<T> q = load_head<T>(p.q, b, h);
  const Matrix<T> k = load_head<T>(p.k, b, kv_head);
  const Matrix<T> v = load_head<T>(p.v, b, kv_head);

  Matrix<T> os(q.rows, q.cols);
  std::vector<T> lse(static_cast<size_t>(q.rows));
  if (p.quantized) {
    sparse_forward_quantized(head_plan, q, k, v, static_cast<T>(p.scale), os, lse);
  } else {
    sparse_forward(head_plan, q, k, v, static_cast<T>(p.scale), os, lse);
  }

  Matrix<T> ol;
  if (p.linear_branch()) {
    const FeatureWeights& w = p.feature_weights;
    const auto phi_q = Phi<T>::of(p.feature_map, w.q, w.dtype, q.cols);
    const auto phi_k = Phi<T>::of(p.feature_map, w.k, w.dtype, k.cols);
    ol = Matrix<T>(q.rows, q.cols);
    linear_forward(head_plan, p.linear_scope, phi_q, q, key_states(head_plan, phi_k, k, v), ol);
  }
  const Matrix<T> out = combine(p, os, ol);

  store_head(out, p.out, b, h);
  if (p.out_sparse.defined()) store_head(os, p.out_sparse, b, h);
  if (p.out_linear.defined()) store_head(ol, p.out_linear, b, h);
  const int64_t row0 = (b * p.q.heads() + h) * q.rows;
  for (int64_t i = 0; i < q.rows; ++i) store_scalar<T>(p.lse, row0 + i, lse_dtype(p.q.dtype), lse[i]);
}

template <typename T>
void forward_all(const SlaForwardParams& p, const RoutingPlanView& plan) {
  const int64_t heads = p.q.heads();
  default_pool()->parallel_for(p.q.batch() * heads, [&](int64_t task) {
    forward_head<T>(p, plan, task / heads, task % heads);
  });
}

}  // namespace

void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan) {
  if (params.q.dtype == DType::float64) {
    forward_all<double>(params, plan);
  } else {
    forward_all<float>(params, plan);
  }
}

}  // namespace slattn::cpu
