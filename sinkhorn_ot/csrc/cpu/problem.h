// The data of one problem, the loop settings and the scratch space of the CPU Sinkhorn
// loop (loop.h), shared by the half-step implementations (steps.h).
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace sinkhorn_ot::cpu {

// kStabilised: the log-domain iterates by the stabilised kernel form (stabilised.h) on
// a dense cost; point clouds run it as kLog (it would store an N x M kernel).
enum class Method : int64_t { kLog = 0, kKernel = 1, kStabilised = 2 };

struct LoopSettings {
  int64_t max_iter = 0;
  bool has_tol = false;  // false: no tolerance, run exactly max_iter iterations
  double tol = 0.0;
  Method method = Method::kLog;
  bool stop_potentials = false;  // balanced problems too stop on the potentials rule
  // Over-relaxation from the target eps on (loop_rules.h): a fixed omega, or (auto) one
  // estimated per problem from the error's rate. omega == 1 and !momentum_auto: none.
  double momentum = 1.0;
  bool momentum_auto = false;
  bool blended() const { return momentum_auto || momentum != 1.0; }
};

// One problem: inputs (C is (n, m) row-major; nullptr for point clouds, whose Steps
// hold the points) and where its outputs go.
template <typename T>
struct Problem {
  const T* C;
  const T* a;   // (n,)
  const T* b;   // (m,)
  const T* f0;  // (n,)
  int64_t n, m;
  const T* eps_row;  // (S,): this problem's row of the eps table, see loop_rules.h
  int64_t S;
  T* f;  // (n,) output
  T* g;  // (m,) output
  // Relaxation of the row / column marginal (loop_rules.h); infinity = hard constraint.
  T rho_a = std::numeric_limits<T>::infinity();
  T rho_b = std::numeric_limits<T>::infinity();
};

struct Outcome {
  int64_t n_iter = 0;
  double err = std::numeric_limits<double>::quiet_NaN();
};

// Scratch buffers, reused across the problems a thread solves.
template <typename T>
struct Workspace {
  std::vector<T> f_next, g_prev, g_plain, log_a, log_b, shifted, row_top, col_max, col_sum, scal, kernel,
      pad;
  // Stabilised kernel form (stabilised.h): reference and latest potentials.
  std::vector<T> f_hat, g_hat, f_seen, g_seen;
  // Point clouds (point_cloud.h): each side's points row-major, transposed, and |p|^2.
  std::vector<T> x_rows, x_cols, x_sq, y_rows, y_cols, y_sq;
};

// v.data() with room for `size` entries (grows, never shrinks).
template <typename V>
inline typename V::value_type* grow(V& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(static_cast<std::size_t>(size));
  return v.data();
}

// A "parallel for" that runs the whole range on the calling thread.
struct SerialFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const F& f) const {
    if (begin < end) f(begin, end);
  }
};

}  // namespace sinkhorn_ot::cpu
