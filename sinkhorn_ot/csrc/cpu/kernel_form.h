// Kernel-form Sinkhorn half-steps (the u, v scalings of Sinkhorn-Knopp) on a row-major
// kernel block K = exp(-C / eps):
//
//   row:  f_i = -eps * log sum_j K_ij v_j,  v_j = b_j exp(g_j / eps)
//   col:  g_j = -eps * log sum_i u_i K_ij,  u_i = a_i exp(f_i / eps)
//
// exp(-C / eps) underflows when C / eps is large; then a sum is 0 and a potential +inf,
// exactly as in the torch backend, and the caller reports it. Nothing here traps.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include "vec_math.h"

namespace sinkhorn_ot::cpu {

// out[i * ldo + j] = exp(-C[i * ldc + j] / eps) for an (n, m) block.
template <typename T>
inline void fill_kernel(const T* C, int64_t ldc, int64_t n, int64_t m, T eps, T* out,
                        int64_t ldo) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec veps(eps);
  for (int64_t i = 0; i < n; ++i) {
    const T* c = C + i * ldc;
    T* o = out + i * ldo;
    int64_t j = 0;
    for (; j + W <= m; j += W) ((Vec(T(0)) - Vec::loadu(c + j)) / veps).exp().store(o + j);
    for (; j < m; ++j) o[j] = std::exp(-c[j] / eps);
  }
}

// out_j = exp(log_w_j + p_j / eps) for j < m: the scaling u (or v) of potentials p.
template <typename T>
inline void scalings(const T* log_w, const T* p, int64_t m, T eps, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec veps(eps);
  int64_t j = 0;
  for (; j + W <= m; j += W) {
    (Vec::loadu(log_w + j) + Vec::loadu(p + j) / veps).exp().store(out + j);
  }
  for (; j < m; ++j) out[j] = std::exp(log_w[j] + p[j] / eps);
}

// out[i] = -tau eps * log(out[i]) for i in [i0, i1), damped by tau (loop_rules.h; 1 for a
// hard marginal), the same vector log on every entry (so an entry's result does not
// depend on how a range was split over threads).
template <typename T>
inline void finish_neg_log(T* out, int64_t i0, int64_t i1, T eps, T tau = T(1)) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec neg_eps(-eps * tau);
  int64_t i = i0;
  for (; i + W <= i1; i += W) (neg_eps * Vec::loadu(out + i).log()).store(out + i);
  if (i < i1) {
    const Lanes<T> tail(i1 - i);
    tail.store(neg_eps * tail.fill(tail.load(out + i), T(1)).log(), out + i);
  }
}

// sum_{j < m} k_j v_j for one kernel row k.
template <typename T>
inline T kernel_dot(const T* k, const T* v, int64_t m) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t j = 0;
  for (; j + 4 * W <= m; j += 4 * W) {
    s0 = at::vec::fmadd(Vec::loadu(k + j), Vec::loadu(v + j), s0);
    s1 = at::vec::fmadd(Vec::loadu(k + j + W), Vec::loadu(v + j + W), s1);
    s2 = at::vec::fmadd(Vec::loadu(k + j + 2 * W), Vec::loadu(v + j + 2 * W), s2);
    s3 = at::vec::fmadd(Vec::loadu(k + j + 3 * W), Vec::loadu(v + j + 3 * W), s3);
  }
  for (; j + W <= m; j += W) s0 = at::vec::fmadd(Vec::loadu(k + j), Vec::loadu(v + j), s0);
  if (j < m) {
    const Lanes<T> tail(m - j);
    s1 = at::vec::fmadd(tail.load(k + j), tail.load(v + j), s1);
  }
  return reduce_sum((s0 + s1) + (s2 + s3));
}

// out[i] = -eps * log sum_{j < m} K[i * ldk + j] v_j for rows i in [i0, i1).
template <typename T>
inline void kernel_rows(const T* K, int64_t ldk, const T* v, int64_t m, int64_t i0, int64_t i1,
                        T eps, T* out, T tau = T(1)) {
  for (int64_t i = i0; i < i1; ++i) out[i] = kernel_dot(K + i * ldk, v, m);
  finish_neg_log(out, i0, i1, eps, tau);
}

// out[j] = -eps * log sum_{i < n} u_i K[i * ldk + j] for j in [j0, j1). The rows are
// streamed four at a time into the column sums `acc` (scratch indexed by j; only
// [j0, j1) is touched).
template <typename T>
inline void kernel_cols(const T* K, int64_t ldk, const T* u, int64_t n, int64_t j0, int64_t j1,
                        T eps, T* out, T* acc, T tau = T(1)) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t width = j1 - j0;
  const Lanes<T> tail(std::max<int64_t>(1, width % W));
  const bool has_tail = width % W != 0;
  const int64_t full_end = j0 + (width / W) * W;
  auto add_rows = [&](auto rows_tag, int64_t i) {
    constexpr int R = decltype(rows_tag)::value;
    Vec ur[R];
    for (int r = 0; r < R; ++r) ur[r] = Vec(u[i + r]);
    const T* k = K + i * ldk;
    const bool first = i == 0;
    auto step = [&](int64_t j, auto tail_tag) {
      constexpr bool kTail = decltype(tail_tag)::value;
      auto load = [&](const T* p) { return kTail ? tail.load(p) : Vec::loadu(p); };
      Vec s = first ? ur[0] * load(k + j) : at::vec::fmadd(ur[0], load(k + j), load(acc + j));
      for (int r = 1; r < R; ++r) s = at::vec::fmadd(ur[r], load(k + r * ldk + j), s);
      if constexpr (kTail) {
        tail.store(s, acc + j);
      } else {
        s.store(acc + j);
      }
    };
    for (int64_t j = j0; j < full_end; j += W) step(j, std::false_type{});
    if (has_tail) step(full_end, std::true_type{});
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) add_rows(std::integral_constant<int, 4>{}, i);
  for (; i < n; ++i) add_rows(std::integral_constant<int, 1>{}, i);
  if (n <= 0) {
    for (int64_t j = j0; j < j1; ++j) acc[j] = T(0);
  }
  for (int64_t j = j0; j < j1; ++j) out[j] = acc[j];
  finish_neg_log(out, j0, j1, eps, tau);
}

}  // namespace sinkhorn_ot::cpu
