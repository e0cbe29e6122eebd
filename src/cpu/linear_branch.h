// Linear branch of SLA on one (batch, head) (SPEC sections 3 and 5):
// per key block states h_n = Kφᵀ V and z_n = Σ Kφ, per query block sums over
// its linear set U_m, and Ol_i = Qφ_i H_m / (Qφ_i · Z_m + ε).
#pragma once

#include <vector>

#include "cpu/feature_map.h"
#include "cpu/head_plan.h"
#include "cpu/scalar.h"

namespace slattn::cpu {

// Per key block states of one key/value head. h: (Nk, F, D), z: (Nk, F).
template <typename T>
struct KeyStates {
  int64_t features = 0;
  int64_t dim = 0;
  Matrix<T> phi_k;  // (Lk, F)
  Matrix<T> h;      // (Nk, F * D)
  Matrix<T> z;      // (Nk, F)
  std::vector<T> h_total, z_total;
};

// Sets out to the sum of the rows `i` of `items` for which include(i) holds.
// Sums whichever side is smaller: the included rows, or the total minus the
// excluded rows (the two agree in exact arithmetic). Returns false, with out
// zeroed, when nothing is included.
template <typename T, typename Include>
bool sum_rows(const Matrix<T>& items, const std::vector<T>& total, Include include, T* out) {
  int64_t included = 0;
  for (int64_t i = 0; i < items.rows; ++i) included += include(i) ? 1 : 0;
  const int64_t width = items.cols;
  if (included == 0) {
    std::fill(out, out + width, T(0));
    return false;
  }
  const bool direct = included * 2 <= items.rows;
  if (direct) {
    std::fill(out, out + width, T(0));
  } else {
    std::copy(total.begin(), total.end(), out);
  }
  for (int64_t i = 0; i < items.rows; ++i) {
    if (include(i) == direct) axpy(direct ? T(1) : T(-1), items.row(i), out, width);
  }
  return true;
}

template <typename T>
std::vector<T> column_totals(const Matrix<T>& items) {
  std::vector<T> total(static_cast<size_t>(items.cols), T(0));
  for (int64_t i = 0; i < items.rows; ++i) axpy(T(1), items.row(i), total.data(), items.cols);
  return total;
}

template <typename T>
KeyStates<T> key_states(const HeadPlan& plan, const Phi<T>& phi_map, const Matrix<T>& k, const Matrix<T>& v) {
  KeyStates<T> states;
  states.phi_k = phi_map.apply(k);
  states.features = states.phi_k.cols;
  states.dim = v.cols;
  states.h = Matrix<T>(plan.k_blocks(), states.features * states.dim);
  states.z = Matrix<T>(plan.k_blocks(), states.features);
  for (int64_t n = 0; n < plan.k_blocks(); ++n) {
    T* h = states.h.row(n);
    T* z = states.z.row(n);
    for (int64_t j = plan.k_begin(n); j < plan.k_end(n); ++j) {
      const T* phi = states.phi_k.row(j);
      for (int64_t f = 0; f < states.features; ++f) axpy(phi[f], v.row(j), h + f * states.dim, states.dim);
      axpy(T(1), phi, z, states.features);
    }
  }
  states.h_total = column_totals(states.h);
  states.z_total = column_totals(states.z);
  return states;
}

// H_m (F * D) and Z_m (F) of query block m; false when U_m is empty.
template <typename T>
bool query_block_state(const HeadPlan& plan, LinearScope scope, const KeyStates<T>& states, int64_t m, T* h_m, T* z_m) {
  auto include = [&](int64_t n) { return plan.in_linear_set(m, n, scope); };
  const bool any = sum_rows(states.h, states.h_total, include, h_m);
  sum_rows(states.z, states.z_total, include, z_m);
  return any;
}

// Ol_i = Qφ_i H / (Qφ_i · Z + ε) for one row; writes the denominator too.
template <typename T>
void linear_row(const T* phi_q, const T* h_m, const T* z_m, int64_t features, int64_t dim, T* out, T& denominator) {
  denominator = dot(phi_q, z_m, features) + static_cast<T>(kLinearEpsilon);
  std::fill(out, out + dim, T(0));
  for (int64_t f = 0; f < features; ++f) axpy(phi_q[f], h_m + f * dim, out, dim);
  for (int64_t c = 0; c < dim; ++c) out[c] /= denominator;
}

// ol: (Lq, D), zero for rows whose U_m is empty.
template <typename T>
void linear_forward(const HeadPlan& plan, LinearScope scope, const Phi<T>& phi_map, const Matrix<T>& q,
                    const KeyStates<T>& states, Matrix<T>& ol) {
  const Matrix<T> phi_q = phi_map.apply(q);
  std::vector<T> h_m(static_cast<size_t>(states.features * states.dim)), z_m(static_cast<size_t>(states.features));
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    const bool any = query_block_state(plan, scope, states, m, h_m.data(), z_m.data());
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      T* out = ol.row(i);
      if (!any) {
        std::fill(out, out + states.dim, T(0));
        continue;
      }
      T denominator;
      linear_row(phi_q.row(i), h_m.data(), z_m.data(), states.features, states.dim, out, denominator);
    }
  }
}

// Gradients of the key states, accumulated over the query heads sharing them.
template <typename T>
struct KeyStateGrads {
  Matrix<T> dh;  // (Nk, F * D)
  Matrix<T> dz;  // (Nk, F)
};

// Accumulates dq, the key-state gradients and (hedgehog) d_weight_q for one
// query head, given dOl. Writes the Ol it recomputes on the way into `ol`
// (rows, D; zero where U_m is empty), for the projection's gradient.
template <typename T>
void linear_backward(const HeadPlan& plan, LinearScope scope, const Phi<T>& phi_map, const Matrix<T>& q,
                     const KeyStates<T>& states, const Matrix<T>& dol, Matrix<T>& dq, KeyStateGrads<T>& grads,
                     Matrix<T>& ol, double* d_weight_q) {
  const int64_t features = states.features;
  const int64_t dim = states.dim;
  const Matrix<T> phi_q = phi_map.apply(q);
  Matrix<T> dphi_q(q.rows, features);
  Matrix<T> dh_m(plan.q_blocks(), features * dim);  // dH_m
  Matrix<T> dz_m(plan.q_blocks(), features);        // dZ_m
  std::vector<T> h_m(static_cast<size_t>(features * dim)), z_m(static_cast<size_t>(features));
  std::vector<T> g(static_cast<size_t>(dim));
  for (int64_t m = 0; m < plan.q_blocks(); ++m) {
    if (!query_block_state(plan, scope, states, m, h_m.data(), z_m.data())) continue;  // Ol = 0: no gradient
    for (int64_t i = plan.q_begin(m); i < plan.q_end(m); ++i) {
      const T* phi = phi_q.row(i);
      T denominator;
      linear_row(phi, h_m.data(), z_m.data(), features, dim, ol.row(i), denominator);
      for (int64_t c = 0; c < dim; ++c) g[c] = dol.row(i)[c] / denominator;
      const T c_i = dot(dol.row(i), ol.row(i), dim) / denominator;
      T* dphi = dphi_q.row(i);
      for (int64_t f = 0; f < features; ++f) dphi[f] = dot(h_m.data() + f * dim, g.data(), dim) - c_i * z_m[f];
      for (int64_t f = 0; f < features; ++f) axpy(phi[f], g.data(), dh_m.row(m) + f * dim, dim);
      axpy(-c_i, phi, dz_m.row(m), features);
    }
  }
  phi_map.backward(q, phi_q, dphi_q, dq, d_weight_q);

  // dh_n = Σ_{m : n ∈ U_m} dH_m, and likewise dz_n (the column direction).
  const std::vector<T> dh_total = column_totals(dh_m);
  const std::vector<T> dz_total = column_totals(dz_m);
  std::vector<T> column_h(static_cast<size_t>(features * dim)), column_z(static_cast<size_t>(features));
  for (int64_t n = 0; n < plan.k_blocks(); ++n) {
    auto include = [&](int64_t m) { return plan.in_linear_set(m, n, scope); };
    if (!sum_rows(dh_m, dh_total, include, column_h.data())) continue;
    sum_rows(dz_m, dz_total, include, column_z.data());
    axpy(T(1), column_h.data(), grads.dh.row(n), features * dim);
    axpy(T(1), column_z.data(), grads.dz.row(n), features);
  }
}

// Pulls the key-state gradients back to dk, dv and (hedgehog) d_weight_k.
template <typename T>
void key_states_backward(const HeadPlan& plan, const Phi<T>& phi_map, const Matrix<T>& k, const Matrix<T>& v,
                         const KeyStates<T>& states, const KeyStateGrads<T>& grads, Matrix<T>& dk, Matrix<T>& dv,
                         double* d_weight_k) {
  const int64_t features = states.features;
  const int64_t dim = states.dim;
  Matrix<T> dphi_k(k.rows, features);
  for (int64_t n = 0; n < plan.k_blocks(); ++n) {
    const T* dh = grads.dh.row(n);
    const T* dz = grads.dz.row(n);
    for (int64_t j = plan.k_begin(n); j < plan.k_end(n); ++j) {
      const T* phi = states.phi_k.row(j);
      T* dphi = dphi_k.row(j);
      for (int64_t f = 0; f < features; ++f) {
        dphi[f] = dot(dh + f * dim, v.row(j), dim) + dz[f];  // dKφ_j = dh_n V_j + dz_n
        axpy(phi[f], dh + f * dim, dv.row(j), dim);          // dV_j += Kφ_j dh_n
      }
    }
  }
  phi_map.backward(k, states.phi_k, dphi_k, dk, d_weight_k);
}

}  // namespace slattn::cpu
