// Sparse branch of SLA on one (batch, head): exact softmax attention over the
// critical key blocks of each query block (SPEC sections 2 and 5).
//
// Per query block the critical keys are gathered once, K transposed to
// (D, keys), so that each row's logits are a sum of contiguous axpys over the
// keys, a loop the compiler vectorises.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/head_plan.h"
#include "cpu/scalar.h"

namespace slattn::cpu {

// The keys of query block m's critical blocks: K transposed and V, gathered.
template <typename T>
struct CriticalKeys {
  std::vector<int64_t> index;  // key rows, ascending
  Matrix<T> k_t;               // (D, keys)
  Matrix<T> v;                 // (keys, D)

  void gather(const HeadPlan& plan, int64_t m, const Matrix<T>& k, const Matrix<T>& values) {
    index.clear();
    for (int64_t i = 0; i < plan.critical_count(m); ++i) {
      const int64_t n = plan.critical_block(m, i);
      for (int64_t j = plan.k_begin(n); j < plan.k_end(n); ++j) index.push_back(j);
    }
    const auto count = static_cast<int64_t>(index.size());
    k_t = Matrix<T>(k.cols, count);
    v = Matrix<T>(count, values.cols);
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t d = 0; d < k.cols; ++d) k_t.row(d)[t] = k.row(index[t])[d];
      std::copy(values.row(index[t]), values.row(index[t]) + values.cols, v.row(t));
    }
  }
  int64_t count() const { return static_cast<int64_t>(index.size()); }

  // logits[t] = scale * q · k_t
  void logits(const T* q, T scale, T* out) const {
    std::fill(out, out + count(), T(0));
    for (int64_t d = 0; d < k_t.rows; ++d) axpy(q[d], k_t.row(d), out, count());
    for (int64_t t = 0; t < count(); ++t) out[t] *= scale;
  }
};

// Walks the query rows block by block with the block's critical keys gathered
// from k and values: row(i, keys, logits, out) fills os row i (zeroed) and
// returns its LSE; a row with no critical block gets Os = 0 and LSE = -inf.
// logits holds room for one value per key.
template <typename T, typename Row>
void for_each_query_row(const HeadPlan& plan, const Matrix<T>& k, const Matrix<T>& values, Matrix<T>& os,
                        std::vector<T>& lse, Row&& row) {
  CriticalKeys<T> keys;
  std::vector<T> logits;
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    keys.gather(plan, m, k, values);
    logits.resize(static_cast<size_t>(keys.count()));
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      T* out = os.row(i);
      std::fill(out, out + os.cols, T(0));
      lse[i] = keys.count() == 0 ? -std::numeric_limits<T>::infinity() : row(i, m, keys, logits.data(), out);
    }
  }
}

// os: (Lq, D) output; lse: (Lq) natural-log LSE.
template <typename T>
void sparse_forward(const HeadPlan& plan, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, T scale,
                    Matrix<T>& os, std::vector<T>& lse) {
  for_each_query_row(plan, k, v, os, lse, [&](int64_t i, int64_t, const CriticalKeys<T>& keys, T* logits, T* out) {
    keys.logits(q.row(i), scale, logits);
    const T peak = *std::max_element(logits, logits + keys.count());
    T total = 0;
    for (int64_t t = 0; t < keys.count(); ++t) total += logits[t] = std::exp(logits[t] - peak);
    for (int64_t t = 0; t < keys.count(); ++t) axpy(logits[t] / total, keys.v.row(t), out, os.cols);
    return peak + std::log(total);
  });
}

// Accumulates the sparse branch's gradients into dq, dk, dv.
template <typename T>
void sparse_backward(const HeadPlan& plan, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                     const Matrix<T>& os, const Matrix<T>& dos, const std::vector<T>& lse, T scale, Matrix<T>& dq,
                     Matrix<T>& dk, Matrix<T>& dv) {
  const int64_t dim = q.cols;
  CriticalKeys<T> keys;
  Matrix<T> v_t;  // (D, keys), for dP = dOs · v over all keys at once
  std::vector<T> p, dp;
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    keys.gather(plan, m, k, v);
    const int64_t count = keys.count();
    v_t = Matrix<T>(dim, count);
    for (int64_t t = 0; t < count; ++t)
      for (int64_t d = 0; d < dim; ++d) v_t.row(d)[t] = keys.v.row(t)[d];
    p.resize(static_cast<size_t>(count));
    dp.resize(static_cast<size_t>(count));
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      if (count == 0) continue;
      const T delta = dot(dos.row(i), os.row(i), dim);  // D_i
      keys.logits(q.row(i), scale, p.data());
      for (auto& x : p) x = std::exp(x - lse[i]);  // P_ij
      std::fill(dp.begin(), dp.end(), T(0));
      for (int64_t d = 0; d < dim; ++d) axpy(dos.row(i)[d], v_t.row(d), dp.data(), count);  // dOs_i · v_j
      for (int64_t t = 0; t < count; ++t) {
        const int64_t j = keys.index[static_cast<size_t>(t)];
        const T ds = p[t] * (dp[t] - delta);
        axpy(p[t], dos.row(i), dv.row(j), dim);
        axpy(scale * ds, k.row(j), dq.row(i), dim);
        axpy(scale * ds, q.row(i), dk.row(j), dim);
      }
    }
  }
}

}  // namespace slattn::cpu
