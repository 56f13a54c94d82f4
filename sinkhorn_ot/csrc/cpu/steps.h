// The two forms of the Sinkhorn half-steps for one problem, on top of the kernels of
// softmin.h (log domain) and kernel_form.h (kernel form):
//
//   row(g, f, i0, i1): f_i = row(g)_i for rows [i0, i1)
//   col(f, g, j0, j1): g_j = col(f)_j for columns [j0, j1)
//   prepare(eps):      the eps of the next half-steps
//   pad_rows / pad_cols: the trailing padded rows / columns, once, at the end
//
// Each half-step may be split over threads by the `For` policy: rows in chunks, columns
// in blocks of whole vectors. Every entry is computed the same way whatever the split,
// so results do not depend on the number of threads.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../loop_rules.h"
#include "kernel_form.h"
#include "problem.h"
#include "softmin.h"

namespace sinkhorn_ot::cpu {

// Minimum elements of C per parallel chunk of a half-step.
inline constexpr int64_t kGrainElements = 1 << 15;

// Shared state of the two half-step implementations.
template <typename T, typename For>
struct StepsBase {
  const Problem<T>& p;
  int64_t n_eff, m_eff;
  Workspace<T>& ws;
  const For& par;
  T eps = T(0);
  T tau_a = T(1), tau_b = T(1);  // damping of the row / column soft-mins (loop_rules.h)

  // The damping of both sides at eps e (1 for a hard marginal).
  void set_damping(T e) {
    tau_a = rules::damping(p.rho_a, e);
    tau_b = rules::damping(p.rho_b, e);
  }

  int64_t row_grain(int64_t cols) const {
    return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
  }

  // Run fn(j0, j1) over [j0, j1) split into blocks of whole vectors.
  template <typename F>
  void for_columns(int64_t j0, int64_t j1, int64_t rows, const F& fn) const {
    constexpr int64_t W = Vectorized<T>::size();
    const int64_t blocks = (j1 - j0 + W - 1) / W;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (std::max<int64_t>(rows, 1) * W));
    par(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      fn(j0 + b0 * W, std::min(j1, j0 + b1 * W));
    });
  }
};

// Log-domain half-steps (softmin.h) on the cost itself.
template <typename T, typename For>
struct LogSteps : StepsBase<T, For> {
  T scale = T(0);

  void prepare(T e) {
    this->eps = e;
    this->set_damping(e);
    scale = ExpTerm<T>::kScale / e;
  }

  // f[i] = row(g)_i for i in [i0, i1).
  void row(const T* g, T* f, int64_t i0, int64_t i1) {
    const auto& p = this->p;
    const int64_t m_eff = this->m_eff;
    T* h = this->ws.shifted.data();
    const T* log_b = this->ws.log_b.data();
    for (int64_t j = 0; j < m_eff; ++j) h[j] = g[j] + this->eps * log_b[j];
    T* top = this->ws.row_top.data();
    const T e = this->eps, s = scale, tau = this->tau_a;
    this->par(i0, i1, this->row_grain(m_eff), [&](int64_t r0, int64_t r1) {
      softmin_rows(p.C, p.m, h, m_eff, r0, r1, e, s, f, top, tau);
    });
  }

  // g[j] = col(f)_j for j in [j0, j1).
  void col(const T* f, T* g, int64_t j0, int64_t j1) {
    const auto& p = this->p;
    const int64_t n_eff = this->n_eff;
    T* k = this->ws.shifted.data();
    const T* log_a = this->ws.log_a.data();
    for (int64_t i = 0; i < n_eff; ++i) k[i] = f[i] + this->eps * log_a[i];
    T* col_max = this->ws.col_max.data();
    T* col_sum = this->ws.col_sum.data();
    const T e = this->eps, s = scale, tau = this->tau_b;
    this->for_columns(j0, j1, n_eff, [&](int64_t c0, int64_t c1) {
      softmin_cols(p.C, p.m, k, n_eff, c0, c1, e, s, g, col_max, col_sum, tau);
    });
  }

  void pad_rows(const T* g, T* f, T e) {
    prepare(e);
    row(g, f, this->n_eff, this->p.n);
  }
  void pad_cols(const T* f, T* g, T e) {
    prepare(e);
    col(f, g, this->m_eff, this->p.m);
  }
};

// Kernel-form half-steps (kernel_form.h) on K = exp(-C / eps), (n_eff, m_eff), rebuilt
// whenever eps changes (annealing).
template <typename T, typename For>
struct KernelSteps : StepsBase<T, For> {
  bool built = false;

  void prepare(T e) {
    if (built && e == this->eps) return;
    this->eps = e;
    this->set_damping(e);
    built = true;
    const auto& p = this->p;
    const int64_t m_eff = this->m_eff;
    T* K = this->ws.kernel.data();
    this->par(0, this->n_eff, this->row_grain(m_eff), [&](int64_t r0, int64_t r1) {
      fill_kernel(p.C + r0 * p.m, p.m, r1 - r0, m_eff, e, K + r0 * m_eff, m_eff);
    });
  }

  // f[i] = row(g)_i for i in [0, n_eff).
  void row(const T* g, T* f, int64_t i0, int64_t i1) {
    rows_of(this->ws.kernel.data(), g, f, i0, i1, 0);
  }

  // g[j] = col(f)_j for j in [0, m_eff).
  void col(const T* f, T* g, int64_t j0, int64_t j1) {
    cols_of(this->ws.kernel.data(), this->m_eff, f, g, j0, j1, 0);
  }

  // Padded rows / columns: their kernel block is built on the fly (C / eps never
  // needs to be stored for them).
  void pad_rows(const T* g, T* f, T e) {
    const auto& p = this->p;
    const int64_t n_eff = this->n_eff, m_eff = this->m_eff, rows = p.n - n_eff;
    T* block = this->ws.pad.data();
    fill_kernel(p.C + n_eff * p.m, p.m, rows, m_eff, e, block, m_eff);
    const T saved = this->eps;
    this->eps = e;
    this->set_damping(e);
    rows_of(block, g, f, n_eff, p.n, n_eff);
    this->eps = saved;
    this->set_damping(saved);
  }
  void pad_cols(const T* f, T* g, T e) {
    const auto& p = this->p;
    const int64_t n_eff = this->n_eff, m_eff = this->m_eff, cols = p.m - m_eff;
    T* block = this->ws.pad.data();
    fill_kernel(p.C + m_eff, p.m, n_eff, cols, e, block, cols);
    const T saved = this->eps;
    this->eps = e;
    this->set_damping(e);
    cols_of(block, cols, f, g, m_eff, p.m, m_eff);
    this->eps = saved;
    this->set_damping(saved);
  }

 private:
  // Rows [i0, i1) of f from a kernel block whose first row is row `first`.
  void rows_of(const T* K, const T* g, T* f, int64_t i0, int64_t i1, int64_t first) {
    const int64_t m_eff = this->m_eff;
    T* v = this->ws.scal.data();
    scalings(this->ws.log_b.data(), g, m_eff, this->eps, v);
    const T e = this->eps, tau = this->tau_a;
    this->par(i0, i1, this->row_grain(m_eff), [&](int64_t r0, int64_t r1) {
      kernel_rows(K, m_eff, v, m_eff, r0 - first, r1 - first, e, f + first, tau);
    });
  }
  // Columns [j0, j1) of g from a kernel block with leading dimension ldk whose first
  // column is column `first`.
  void cols_of(const T* K, int64_t ldk, const T* f, T* g, int64_t j0, int64_t j1, int64_t first) {
    const int64_t n_eff = this->n_eff;
    T* u = this->ws.scal.data();
    scalings(this->ws.log_a.data(), f, n_eff, this->eps, u);
    T* acc = this->ws.col_sum.data();
    const T e = this->eps, tau = this->tau_b;
    this->for_columns(j0, j1, n_eff, [&](int64_t c0, int64_t c1) {
      kernel_cols(K, ldk, u, n_eff, c0 - first, c1 - first, e, g + first, acc + first, tau);
    });
  }
};

}  // namespace sinkhorn_ot::cpu
