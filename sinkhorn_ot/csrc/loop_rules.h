// The loop contract of every native Sinkhorn loop (csrc/cpu/loop.h and the CUDA solvers
// in csrc/cuda/), in one header: the eps schedule, the stopping rule and the marginal
// violation. The torch reference is sinkhorn_ot/_loop.py; docs/native.md describes it.
//
//   * eps schedule: a table eps_table (B, S), S >= 1, computed once in Python
//     (sinkhorn_ot._loop.eps_table). Iteration t uses column min(t, S - 1); the last
//     column is the target eps. With S == 1 there is no annealing.
//   * stopping rule: before the row update of iteration t, the relative L1 violation of
//     the current (f, g = col(f)) is err = sum_i a_i |expm1((f_i - f_next_i) / eps_t)| / mass,
//     accumulated in float64 over rows with a_i > 0. A problem stops at iteration t when
//     a tolerance is given, the annealing is over (t >= S - 1) and err <= tol. It always
//     stops at t == max_iter.
//
// Plain C++ usable from host code and from CUDA device code (SINKHORN_OT_HD); no torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SINKHORN_OT_HD __host__ __device__
#else
#define SINKHORN_OT_HD
#endif

namespace sinkhorn_ot::rules {

// Column of the eps table used by iteration t (the table has S >= 1 columns).
SINKHORN_OT_HD inline int64_t eps_column(int64_t t, int64_t S) { return t < S - 1 ? t : S - 1; }

// eps of iteration t for one problem whose table row is `row` (S entries).
template <typename T>
SINKHORN_OT_HD inline T eps_at(const T* row, int64_t S, int64_t t) {
  return row[eps_column(t, S)];
}

// Whether iteration t runs at the target eps (annealing over), so that it may stop.
SINKHORN_OT_HD inline bool at_target(int64_t t, int64_t S) { return t >= S - 1; }

// One row's term of the violation: a_i |expm1((f_i - f_next_i) / eps)|, 0 for padding
// (a_i = 0, whose ratio may overflow at tiny eps and carries no mass).
template <typename T>
SINKHORN_OT_HD inline double violation_term(T a, T f, T f_next, T eps) {
  if (!(a > T(0))) return 0.0;
  const double r = expm1((static_cast<double>(f) - static_cast<double>(f_next)) /
                         static_cast<double>(eps));
  return static_cast<double>(a) * fabs(r);
}

// The stopping decision after the violation `err` of iteration t is known.
// has_tol = false: run exactly max_iter iterations.
SINKHORN_OT_HD inline bool should_stop(double err, bool has_tol, double tol, int64_t t,
                                       int64_t S, int64_t max_iter) {
  if (t >= max_iter) return true;
  if (!(err == err) || err == INFINITY) return true;  // non-finite: the caller reports it
  return has_tol && at_target(t, S) && err <= tol;
}

}  // namespace sinkhorn_ot::rules
