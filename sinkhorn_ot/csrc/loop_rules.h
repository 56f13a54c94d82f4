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
//   * second measure, the potentials rule: err = max_i |f_next_i - f_i| / eps_t over rows
//     with a_i > 0 (float64, a NaN propagates), the sup-norm change of the row potential
//     over one iteration relative to eps. Problems with a relaxed marginal (rho < inf)
//     always use it; a balanced problem uses it when the caller asks (stop_potentials).
//     The same should_stop decides on either measure.
//   * momentum (over-relaxation) omega != 1, balanced problems only: at the target eps
//     (t >= S - 1), every half-step moves its potential omega of the way to the Sinkhorn
//     update, f <- f + omega (row(g) - f), then g <- g + omega (col(f) - g), on the
//     weighted entries (padding takes the plain update). g is then no longer col(f), so
//     the violation adds the column term sum_j b_j |expm1((g_j - col(f)_j) / eps_t)|,
//     col(f) being the update before the blend (computed every iteration). A problem
//     engages momentum (omega != 1) from the first iteration whose error is at most
//     kMomentumThreshold; the adaptive rule then runs kMomentumWindow plain iterations
//     and fixes omega = momentum_from_rate over them (Lehmann et al. 2021).
//   * unbalanced problems: each half-step's soft-min is multiplied by the damping
//     rho / (rho + eps_t) of its side (rows: rho_a, columns: rho_b), exactly 1 for a
//     hard side (rho = inf); see docs/unbalanced.md.
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

// Damping of a half-step of a side relaxed with strength rho: rho / (rho + eps), exactly
// 1 for a hard side (rho = inf, where the formula would read inf / inf).
template <typename T>
SINKHORN_OT_HD inline T damping(T rho, T eps) {
  return rho == static_cast<T>(INFINITY) ? T(1) : rho / (rho + eps);
}

// Whether a problem stops on its potentials: asked for, or a relaxed side.
template <typename T>
SINKHORN_OT_HD inline bool uses_potentials(bool stop_potentials, T rho_a, T rho_b) {
  const T inf = static_cast<T>(INFINITY);
  return stop_potentials || rho_a < inf || rho_b < inf;
}

// One row's term of the potentials rule: |f_next_i - f_i| / eps, 0 for padding.
template <typename T>
SINKHORN_OT_HD inline double potential_term(T a, T f, T f_next, T eps) {
  if (!(a > T(0))) return 0.0;
  return fabs(static_cast<double>(f_next) - static_cast<double>(f)) / static_cast<double>(eps);
}

// One row's term of the measure of a problem's rule.
template <typename T>
SINKHORN_OT_HD inline double stop_term(bool potentials, T a, T f, T f_next, T eps) {
  return potentials ? potential_term(a, f, f_next, eps) : violation_term(a, f, f_next, eps);
}

// Accumulates two partial measures: a sum (marginals) or a maximum that keeps a NaN
// (potentials), so that every loop reduces its terms the same way.
SINKHORN_OT_HD inline double stop_combine(bool potentials, double x, double y) {
  if (!potentials) return x + y;
  return (x != x || x > y) ? x : y;
}

// The measure from the reduced terms: relative to the mass (marginals) or as is.
SINKHORN_OT_HD inline double stop_value(bool potentials, double total, double mass) {
  return potentials ? total : total / mass;
}

// The stopping decision after the violation `err` of iteration t is known.
// has_tol = false: run exactly max_iter iterations.
SINKHORN_OT_HD inline bool should_stop(double err, bool has_tol, double tol, int64_t t,
                                       int64_t S, int64_t max_iter) {
  if (t >= max_iter) return true;
  if (!(err == err) || err == INFINITY) return true;  // non-finite: the caller reports it
  return has_tol && at_target(t, S) && err <= tol;
}

// Momentum engages once a problem's error at the target eps is at most this
// (over-relaxation converges near the fixed point, not from anywhere); the adaptive
// rule's window (in iterations) of the rate estimate; the largest rate it uses (omega
// <= 2 / (1 + sqrt(1e-3)) = 1.94: closer to 1 the estimate is noise, omega -> 2 stalls).
constexpr double kMomentumThreshold = 0.1;
constexpr int64_t kMomentumWindow = 10;
constexpr double kMomentumMaxRate = 0.999;

// omega = 2 / (1 + sqrt(1 - theta)) for the rate theta = (err_now / err_before)^(1 /
// kMomentumWindow) of plain Sinkhorn (the optimal over-relaxation of a linear iteration
// with that rate); 1 when an error is 0 or not finite.
SINKHORN_OT_HD inline double momentum_from_rate(double err_now, double err_before) {
  const double ratio = err_now / err_before;
  if (!(err_now > 0.0) || !(err_before > 0.0) || !(ratio < INFINITY)) return 1.0;
  double rate = pow(ratio, 1.0 / static_cast<double>(kMomentumWindow));
  if (!(rate == rate) || rate < 0.0) rate = 0.0;
  if (rate > kMomentumMaxRate) rate = kMomentumMaxRate;
  return 2.0 / (1.0 + sqrt(1.0 - rate));
}

// Whether iteration t's update may blend (the annealing is over).
SINKHORN_OT_HD inline bool momentum_on(int64_t t, int64_t S) { return t >= S - 1; }

}  // namespace sinkhorn_ot::rules
