// The Sinkhorn loop of one problem, native twin of sinkhorn_ot/_loop.py::solve_potentials:
// same iterates, same stopping rule, same n_iter and err. The eps schedule, the stopping
// decision and the violation are those of ../loop_rules.h, shared with the CUDA loops
// (see docs/native.md). The caller chooses the parallelism through the `For` policy:
// SerialFor inside a loop over the batch that is already parallel, or a policy that
// splits each half-step over rows / column blocks (at::parallel_for in the glue).
//
// The half-steps come from a `Steps` object (steps.h for a dense cost, point_cloud.h
// for point clouds) with prepare(eps), row, col, pad_rows and pad_cols.
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

#include "../loop_rules.h"
#include "problem.h"
#include "stabilised.h"
#include "steps.h"

namespace sinkhorn_ot::cpu {

// The stopping measure of (f, col(f)) from f and f_next = row(col(f)), over the rows
// i < n: the relative L1 marginal violation (rules::violation_term summed in float64) or,
// for the potentials rule, the largest rules::potential_term.
template <typename T>
inline double stop_measure(const T* f, const T* f_next, const T* a, int64_t n, T eps,
                           double mass, bool potentials) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc = rules::stop_combine(potentials, acc,
                              rules::stop_term(potentials, a[i], f[i], f_next[i], eps));
  }
  return rules::stop_value(potentials, acc, mass);
}

template <typename T, typename Steps>
Outcome sinkhorn_loop(const Problem<T>& p, const LoopSettings& s, Steps& steps, int64_t n_eff,
                      int64_t m_eff, Workspace<T>& ws) {
  double mass = 0.0;
  for (int64_t i = 0; i < p.n; ++i) mass += static_cast<double>(p.a[i]);
  const bool potentials = rules::uses_potentials(s.stop_potentials, p.rho_a, p.rho_b);

  std::copy(p.f0, p.f0 + p.n, p.f);
  T* f = p.f;
  T* f_next = ws.f_next.data();
  T* g = p.g;
  T* g_prev = ws.g_prev.data();

  T eps_t = rules::eps_at(p.eps_row, p.S, 0);
  T eps_fg = eps_t;  // the eps of the current (f, g)
  steps.prepare(eps_t);
  steps.col(f, g, 0, m_eff);
  Outcome out;
  // Momentum (loop_rules.h): g_plain = col(f), the update g was blended from.
  const bool blended = s.blended();
  T* g_plain = blended ? ws.g_plain.data() : nullptr;
  if (blended) std::copy(g, g + m_eff, g_plain);
  // The iteration at which momentum engaged (-1: not yet), the error then, and omega.
  int64_t engaged = -1;
  double window_err = 0.0, omega = 1.0;
  for (int64_t t = 0; t <= s.max_iter; ++t) {
    if (t > 0 && t < p.S) {  // annealing: a new column of the table
      eps_t = rules::eps_at(p.eps_row, p.S, t);
      steps.prepare(eps_t);
    }
    steps.row(g, f_next, 0, n_eff);
    if (s.has_tol || t == s.max_iter || blended) {
      out.err = stop_measure(f, f_next, p.a, n_eff, eps_t, mass, potentials);
      if (blended) out.err += stop_measure(g, g_plain, p.b, m_eff, eps_t, mass, false);
      if (blended && rules::momentum_on(t, p.S)) {
        if (engaged < 0 && out.err <= rules::kMomentumThreshold) {
          engaged = t;
          window_err = out.err;
          if (!s.momentum_auto) omega = s.momentum;
        }
        if (s.momentum_auto && engaged >= 0 && t == engaged + rules::kMomentumWindow) {
          omega = rules::momentum_from_rate(out.err, window_err);
        }
      }
      // A non-finite err also stops; the caller reports it, as the torch loop raises.
      if (rules::should_stop(out.err, s.has_tol, s.tol, t, p.S, s.max_iter)) break;
    }
    if (blended && rules::momentum_on(t, p.S)) {
      // f <- f + omega (row(g) - f), g <- g + omega (col(f) - g) on weighted entries;
      // padding takes the plain update. g_prev keeps the g of the row update (pad_rows).
      const T w = static_cast<T>(omega);
      for (int64_t i = 0; i < n_eff; ++i) {
        f[i] = p.a[i] > T(0) ? f[i] + w * (f_next[i] - f[i]) : f_next[i];
      }
      std::copy(g, g + m_eff, g_prev);
      steps.col(f, g_plain, 0, m_eff);
      for (int64_t j = 0; j < m_eff; ++j) {
        g[j] = p.b[j] > T(0) ? g[j] + w * (g_plain[j] - g[j]) : g_plain[j];
      }
    } else {
      std::swap(f, f_next);
      std::swap(g, g_prev);
      steps.col(f, g, 0, m_eff);
      if (blended) std::copy(g, g + m_eff, g_plain);
    }
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

// Sizes without trailing padding, log weights and the scratch every Steps needs.
template <typename T>
inline std::pair<int64_t, int64_t> prepare_problem(const Problem<T>& p, Workspace<T>& ws) {
  const int64_t n = p.n, m = p.m;
  const int64_t nm = std::max(n, m);
  grow(ws.f_next, n);
  grow(ws.g_prev, m);
  grow(ws.g_plain, m);
  T* log_a = grow(ws.log_a, n);
  T* log_b = grow(ws.log_b, m);
  grow(ws.shifted, nm);
  grow(ws.row_top, n);
  grow(ws.col_max, m);
  grow(ws.col_sum, m);
  grow(ws.scal, nm);
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) log_a[i] = p.a[i] > 0 ? std::log(p.a[i]) : kMinusInf;
  for (int64_t j = 0; j < m; ++j) log_b[j] = p.b[j] > 0 ? std::log(p.b[j]) : kMinusInf;
  return {effective_size(p.a, n), effective_size(p.b, m)};
}

// Solve one problem with a dense cost p.C: sizes, log weights, scratch, then the loop.
template <typename T, typename For>
Outcome solve_problem(const Problem<T>& p, const LoopSettings& s, Workspace<T>& ws,
                      const For& par) {
  const auto [n_eff, m_eff] = prepare_problem(p, ws);
  if (s.method == Method::kKernel) {
    grow(ws.kernel, n_eff * m_eff);
    grow(ws.pad, std::max((p.n - n_eff) * m_eff, n_eff * (p.m - m_eff)));
    KernelSteps<T, For> steps{{p, n_eff, m_eff, ws, par}};
    return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
  }
  if (s.method == Method::kStabilised) {
    grow(ws.kernel, n_eff * m_eff);
    StabilisedSteps<T, For> steps{{p, n_eff, m_eff, ws, par}};
    return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
  }
  LogSteps<T, For> steps{{p, n_eff, m_eff, ws, par}};
  return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
}

}  // namespace sinkhorn_ot::cpu
