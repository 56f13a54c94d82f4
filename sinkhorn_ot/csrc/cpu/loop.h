// The Sinkhorn loop of one problem, native twin of sinkhorn_ot/_loop.py::solve_potentials:
// same iterates, same stopping rule, same n_iter and err (see that file and
// docs/native.md). The caller chooses the parallelism through the `For` policy:
// SerialFor inside a loop over the batch that is already parallel, or a policy that
// splits each half-step over rows / column blocks (at::parallel_for in the glue).
//
// Zero-weight padding at the end of a problem (rows i >= n_eff, columns j >= m_eff) is
// left out of every iteration: padded rows/columns never enter the other side's sums.
// Their potentials are computed once at the end, from the same (f, g, eps) the torch
// backend would have used on its last update, so the outputs are the same.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "problem.h"
#include "steps.h"

namespace sinkhorn_ot::cpu {

// sum_i a_i |expm1((f_i - f_next_i) / eps)| / mass in float64, over rows with a_i > 0:
// the relative L1 marginal violation of (f, col(f)) (see _updates.row_violation).
template <typename T>
inline double marginal_violation(const T* f, const T* f_next, const T* a, int64_t n, T eps,
                                 double mass, double* buf) {
  using VecD = Vectorized<double>;
  constexpr int64_t W = VecD::size();
  const double e = static_cast<double>(eps);
  double* ratio = buf;
  double* weight = buf + n;
  for (int64_t i = 0; i < n; ++i) {
    const bool on = a[i] > 0;
    ratio[i] = on ? (static_cast<double>(f[i]) - static_cast<double>(f_next[i])) / e : 0.0;
    weight[i] = on ? static_cast<double>(a[i]) : 0.0;
  }
  VecD acc(0.0);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    acc = at::vec::fmadd(VecD::loadu(weight + i), VecD::loadu(ratio + i).expm1().abs(), acc);
  }
  if (i < n) {
    const Lanes<double> tail(n - i);
    acc = at::vec::fmadd(tail.load(weight + i), tail.load(ratio + i).expm1().abs(), acc);
  }
  return reduce_sum(acc) / mass;
}

template <typename T, typename Steps>
Outcome sinkhorn_loop(const Problem<T>& p, const LoopSettings& s, Steps& steps, int64_t n_eff,
                      int64_t m_eff, Workspace<T>& ws) {
  auto eps_at = [&](int64_t t) -> T {
    if (t >= s.anneal_steps) return p.eps;
    const T annealed = p.eps0 * static_cast<T>(std::pow(s.eps_scaling, static_cast<double>(t)));
    return std::max(p.eps, annealed);
  };
  double mass = 0.0;
  for (int64_t i = 0; i < p.n; ++i) mass += static_cast<double>(p.a[i]);
  const bool use_tol = s.tol >= 0.0;

  std::copy(p.f0, p.f0 + p.n, p.f);
  T* f = p.f;
  T* f_next = ws.f_next.data();
  T* g = p.g;
  T* g_prev = ws.g_prev.data();

  T eps_t = eps_at(0);
  T eps_fg = eps_t;  // the eps of the current (f, g)
  steps.prepare(eps_t);
  steps.col(f, g, 0, m_eff);
  Outcome out;
  for (int64_t t = 0; t <= s.max_iter; ++t) {
    if (t > 0 && t <= s.anneal_steps) {
      eps_t = eps_at(t);
      steps.prepare(eps_t);
    }
    steps.row(g, f_next, 0, n_eff);
    const bool last = t == s.max_iter;
    if (use_tol || last) {
      const double v = marginal_violation(f, f_next, p.a, n_eff, eps_t, mass, ws.viol.data());
      out.err = v;
      if (!std::isfinite(v)) break;  // reported by the caller, as the torch loop raises
      if (use_tol && t >= s.anneal_steps && v <= s.tol) break;
      if (last) break;
    }
    std::swap(f, f_next);
    std::swap(g, g_prev);
    steps.col(f, g, 0, m_eff);
    eps_fg = eps_t;
    ++out.n_iter;
  }
  // f = row(g_prev) and g = col(f) on the last update: finish the padded entries.
  if (n_eff < p.n && out.n_iter > 0) steps.pad_rows(g_prev, f, eps_fg);
  if (m_eff < p.m) steps.pad_cols(f, g, eps_fg);
  if (f != p.f) std::copy(f, f + p.n, p.f);
  if (g != p.g) std::copy(g, g + p.m, p.g);
  return out;
}

// Length of w without its trailing zero (padding) weights.
template <typename T>
inline int64_t effective_size(const T* w, int64_t size) {
  while (size > 0 && !(w[size - 1] > 0)) --size;
  return size;
}

// Solve one problem: sizes without trailing padding, log weights, scratch, then the loop.
template <typename T, typename For>
Outcome solve_problem(const Problem<T>& p, const LoopSettings& s, Workspace<T>& ws,
                      const For& par) {
  const int64_t n = p.n, m = p.m;
  const int64_t n_eff = effective_size(p.a, n), m_eff = effective_size(p.b, m);
  const int64_t nm = std::max(n, m);
  grow(ws.f_next, n);
  grow(ws.g_prev, m);
  T* log_a = grow(ws.log_a, n);
  T* log_b = grow(ws.log_b, m);
  grow(ws.shifted, nm);
  grow(ws.row_top, n);
  grow(ws.col_max, m);
  grow(ws.col_sum, m);
  grow(ws.scal, nm);
  grow(ws.viol, 2 * n);
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) log_a[i] = p.a[i] > 0 ? std::log(p.a[i]) : kMinusInf;
  for (int64_t j = 0; j < m; ++j) log_b[j] = p.b[j] > 0 ? std::log(p.b[j]) : kMinusInf;
  if (s.method == Method::kKernel) {
    grow(ws.kernel, n_eff * m_eff);
    grow(ws.pad, std::max((n - n_eff) * m_eff, n_eff * (m - m_eff)));
    KernelSteps<T, For> steps{{p, n_eff, m_eff, ws, par}};
    return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
  }
  LogSteps<T, For> steps{{p, n_eff, m_eff, ws, par}};
  return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
}

}  // namespace sinkhorn_ot::cpu
