// Sparse branch of SLA on one (batch, head): exact softmax attention over the
// critical key blocks of each query block (SPEC sections 2 and 5).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/head_plan.h"
#include "cpu/scalar.h"

namespace slattn::cpu {

// Keys that query block m attends to exactly, in ascending order.
inline std::vector<int64_t> critical_keys(const HeadPlan& plan, int64_t m) {
  std::vector<int64_t> keys;
  for (int64_t i = 0; i < plan.critical_count(m); ++i) {
    const int64_t n = plan.critical_block(m, i);
    for (int64_t j = plan.k_begin(n); j < plan.k_end(n); ++j) keys.push_back(j);
  }
  return keys;
}

// os: (Lq, D) output; lse: (Lq) natural-log LSE. A row with no critical block
// gets Os = 0 and LSE = -inf.
template <typename T>
void sparse_forward(const HeadPlan& plan, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, T scale,
                    Matrix<T>& os, std::vector<T>& lse) {
  const int64_t dim = q.cols;
  std::vector<T> logits;
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    const std::vector<int64_t> keys = critical_keys(plan, m);
    logits.resize(keys.size());
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      T* out = os.row(i);
      std::fill(out, out + dim, T(0));
      if (keys.empty()) {
        lse[i] = -std::numeric_limits<T>::infinity();
        continue;
      }
      T peak = -std::numeric_limits<T>::infinity();
      for (size_t t = 0; t < keys.size(); ++t) {
        logits[t] = scale * dot(q.row(i), k.row(keys[t]), dim);
        peak = std::max(peak, logits[t]);
      }
      T total = 0;
      for (size_t t = 0; t < keys.size(); ++t) total += std::exp(logits[t] - peak);
      lse[i] = peak + std::log(total);
      for (size_t t = 0; t < keys.size(); ++t) axpy(std::exp(logits[t] - lse[i]), v.row(keys[t]), out, dim);
    }
  }
}

// Accumulates the sparse branch's gradients into dq, dk, dv.
template <typename T>
void sparse_backward(const HeadPlan& plan, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                     const Matrix<T>& os, const Matrix<T>& dos, const std::vector<T>& lse, T scale, Matrix<T>& dq,
                     Matrix<T>& dk, Matrix<T>& dv) {
  const int64_t dim = q.cols;
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    const std::vector<int64_t> keys = critical_keys(plan, m);
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      const T delta = dot(dos.row(i), os.row(i), dim);  // D_i
      for (const int64_t j : keys) {
        const T p = std::exp(scale * dot(q.row(i), k.row(j), dim) - lse[i]);
        axpy(p, dos.row(i), dv.row(j), dim);
        const T ds = p * (dot(dos.row(i), v.row(j), dim) - delta);
        axpy(scale * ds, k.row(j), dq.row(i), dim);
        axpy(scale * ds, q.row(i), dk.row(j), dim);
      }
    }
  }
}

}  // namespace slattn::cpu
