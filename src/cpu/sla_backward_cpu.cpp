// Backward of SLA on the CPU: one task per (batch, key/value head), which owns
// dK and dV of that head and loops over the query heads that share it (GQA).
#include <vector>

#include "cpu/linear_branch.h"
#include "cpu/sla_cpu.h"
#include "cpu/sparse_branch.h"
#include "cpu/thread_pool.h"

namespace slattn::cpu {
namespace {

// Per-task partial sums of the parameters' gradients, reduced afterwards in
// task order so the result does not depend on thread timing.
struct ParameterGrads {
  std::vector<double> weight;     // (D, D) of the projection
  std::vector<double> bias;       // (D)
  std::vector<double> feature_q;  // (D, D) of hedgehog's W_q, from the query rows
  std::vector<double> feature_k;  // (D, D) of hedgehog's W_k, from the key rows
};

// Pointer to a partial sum, or null when it is not being computed.
double* data_or_null(std::vector<double>& partial) { return partial.empty() ? nullptr : partial.data(); }

// Σ over the tasks of one partial sum, in task order.
double task_sum(const std::vector<ParameterGrads>& partial, std::vector<double> ParameterGrads::*member, int64_t e) {
  double total = 0;
  for (const auto& grads : partial) total += (grads.*member)[static_cast<size_t>(e)];
  return total;
}

template <typename T>
Matrix<T> load_optional(const TensorView& view, int64_t b, int64_t h, int64_t rows, int64_t cols) {
  return view.defined() ? load_head<T>(view, b, h) : Matrix<T>(rows, cols);
}

template <typename T>
void backward_kv_head(const SlaBackwardParams& p, const RoutingPlanView& plan, int64_t b, int64_t kv_head,
                      ParameterGrads& partial) {
  const int64_t group = p.q.heads() / p.k.heads();
  const int64_t dim = p.q.head_dim();
  const T scale = static_cast<T>(p.scale);
  const Matrix<T> k = load_head<T>(p.k, b, kv_head);
  const Matrix<T> v = load_head<T>(p.v, b, kv_head);
  Matrix<T> dk(k.rows, dim), dv(v.rows, dim);

  const bool linear = p.linear_branch();
  const HeadPlan first_plan = HeadPlan::of(plan, b, kv_head * group);  // key-block geometry is shared
  const FeatureWeights& fw = p.feature_weights;
  const auto phi_q = Phi<T>::of(p.feature_map, fw.q, fw.dtype, dim);
  const auto phi_k = Phi<T>::of(p.feature_map, fw.k, fw.dtype, dim);
  KeyStates<T> states;
  KeyStateGrads<T> state_grads;
  if (linear) {
    states = key_states(first_plan, phi_k, k, v);
    state_grads.dh = Matrix<T>(first_plan.k_blocks(), states.features * dim);
    state_grads.dz = Matrix<T>(first_plan.k_blocks(), states.features);
  }
  const std::vector<T> w = p.proj_weight ? load_vector<T>(p.proj_weight, dim * dim, p.proj_dtype) : std::vector<T>();

  for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    const HeadPlan head_plan = HeadPlan::of(plan, b, h);
    const Matrix<T> q = load_head<T>(p.q, b, h);
    const Matrix<T> os = load_head<T>(p.out_sparse, b, h);
    const Matrix<T> dout = load_head<T>(p.dout, b, h);
    Matrix<T> dos = load_optional<T>(p.dout_sparse, b, h, q.rows, dim);
    for (size_t i = 0; i < dos.values.size(); ++i) dos.values[i] += dout.values[i];
    std::vector<T> lse(static_cast<size_t>(q.rows));
    const int64_t row0 = (b * p.q.heads() + h) * q.rows;
    for (int64_t i = 0; i < q.rows; ++i) lse[i] = load_scalar<T>(p.lse, row0 + i, lse_dtype(p.q.dtype));

    Matrix<T> dq(q.rows, dim);
    sparse_backward(head_plan, q, k, v, os, dos, lse, scale, dq, dk, dv);

    if (linear) {
      // dOl = dO · W + (extra gradient on Ol)
      Matrix<T> dol = load_optional<T>(p.dout_linear, b, h, q.rows, dim);
      if (p.proj_weight)
        for (int64_t i = 0; i < q.rows; ++i)
          for (int64_t r = 0; r < dim; ++r) axpy(dout.row(i)[r], w.data() + r * dim, dol.row(i), dim);
      Matrix<T> ol(q.rows, dim);
      linear_backward(head_plan, p.linear_scope, phi_q, q, states, dol, dq, state_grads, ol,
                      data_or_null(partial.feature_q));
      if (p.proj_weight)  // dW = Σ dOᵀ Ol
        for (int64_t i = 0; i < q.rows; ++i)
          for (int64_t r = 0; r < dim; ++r)
            for (int64_t c = 0; c < dim; ++c) partial.weight[r * dim + c] += double(dout.row(i)[r]) * double(ol.row(i)[c]);
    }
    if (p.has_proj_bias)
      for (int64_t i = 0; i < q.rows; ++i)
        for (int64_t r = 0; r < dim; ++r) partial.bias[r] += double(dout.row(i)[r]);
    store_head(dq, p.dq, b, h);
  }
  if (linear)
    key_states_backward(first_plan, phi_k, k, v, states, state_grads, dk, dv, data_or_null(partial.feature_k));
  store_head(dk, p.dk, b, kv_head);
  store_head(dv, p.dv, b, kv_head);
}

template <typename T>
void backward_all(const SlaBackwardParams& p, const RoutingPlanView& plan) {
  const int64_t kv_heads = p.k.heads();
  const int64_t dim = p.q.head_dim();
  const int64_t tasks = p.q.batch() * kv_heads;
  const bool feature_weights = has_feature_weights(p.feature_map);
  std::vector<ParameterGrads> partial(static_cast<size_t>(tasks));
  for (auto& grads : partial) {
    if (p.proj_weight) grads.weight.assign(static_cast<size_t>(dim * dim), 0.0);
    if (p.has_proj_bias) grads.bias.assign(static_cast<size_t>(dim), 0.0);
    if (feature_weights) {
      grads.feature_q.assign(static_cast<size_t>(dim * dim), 0.0);
      grads.feature_k.assign(static_cast<size_t>(dim * dim), 0.0);
    }
  }
  default_pool()->parallel_for(tasks, [&](int64_t task) {
    backward_kv_head<T>(p, plan, task / kv_heads, task % kv_heads, partial[static_cast<size_t>(task)]);
  });
  if (p.proj_weight)
    for (int64_t e = 0; e < dim * dim; ++e)
      store_scalar(p.d_proj_weight, e, p.proj_dtype, task_sum(partial, &ParameterGrads::weight, e));
  if (p.has_proj_bias)
    for (int64_t r = 0; r < dim; ++r)
      store_scalar(p.d_proj_bias, r, p.proj_dtype, task_sum(partial, &ParameterGrads::bias, r));
  if (feature_weights) {
    // Zero without the linear branch; a tied W gets the sum of both uses.
    const DType dtype = p.feature_weights.dtype;
    for (int64_t e = 0; e < dim * dim; ++e) {
      const double from_q = task_sum(partial, &ParameterGrads::feature_q, e);
      const double from_k = task_sum(partial, &ParameterGrads::feature_k, e);
      if (p.feature_weights.tied()) {
        store_scalar(p.d_feature_weight_q, e, dtype, from_q + from_k);
      } else {
        store_scalar(p.d_feature_weight_q, e, dtype, from_q);
        store_scalar(p.d_feature_weight_k, e, dtype, from_k);
      }
    }
  }
}

}  // namespace

void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan) {
  if (params.q.dtype == DType::float64) {
    backward_all<double>(params, plan);
  } else {
    backward_all<float>(params, plan);
  }
}

}  // namespace slattn::cpu
