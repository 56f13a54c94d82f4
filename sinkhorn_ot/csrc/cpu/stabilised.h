// Stabilised kernel-form half-steps (method="stabilised"): the log-domain iterates at
// the cost of the kernel form, after Schmitzer (2019, "Stabilized sparse scaling
// algorithms for entropy regularized transport problems", Algorithm 2: absorption).
//
// The kernel is taken relative to reference potentials (f^, g^):
//
//   K~_ij = exp((f^_i + g^_j - C_ij) / eps),                          (n_eff, m_eff)
//   row:  f_i = f^_i - eps * log sum_j K~_ij v_j,  v_j = b_j exp((g_j - g^_j) / eps)
//   col:  g_j = g^_j - eps * log sum_i u_i K~_ij,  u_i = a_i exp((f_i - f^_i) / eps)
//
// which is the log-domain update exactly (softmin.h), but costs a matrix-vector product
// and n + m exponentials per half-step instead of n * m exponentials. K~ stays in range
// because (f^, g^) are kept close to the iterates:
//
//   * absorption: when a scaling leaves exp(+-kAbsorb) (|f - f^| or |g - g^| above
//     kAbsorb * eps somewhere) or eps changes, (f^, g^) become the latest consistent
//     pair of iterates (f, col(f)) or (row(g), g) and K~ is rebuilt (n * m exponentials,
//     the cost of one log-domain half-step). Such a pair makes every entry of K~ at most
//     max(b) / min(a) or 1 / min(b), so the rebuild itself cannot overflow.
//   * exact fallback: a row or column whose sum falls outside [kLow, kHigh] (or is not
//     finite) is recomputed by the log-domain kernel of softmin.h. So an entry that
//     underflowed in K~ never matters (its term is below kLow * 2^-(precision) of the
//     sum), and no input makes a potential NaN that the log domain would not.
//
// Padded rows and columns (after n_eff, m_eff) take the log-domain kernel directly.
// Every entry is computed the same way whatever the thread split.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernel_form.h"
#include "softmin.h"
#include "steps.h"

namespace sinkhorn_ot::cpu {

// Ranges of the stabilised kernel form, per scalar type. kAbsorb bounds |log u|, |log v|;
// kLow / kHigh bound the sums that the fast path accepts. A K~ entry that underflowed
// (below 2^-126 in float32, 2^-1022 in float64) weighs at most exp(kAbsorb) times that,
// relative to a sum of at least kLow: below 1e-13 (float32) and 1e-170 (float64) per
// term, so the fast path agrees with the log domain to rounding.
template <typename T>
struct StabilisedRange;
template <>
struct StabilisedRange<float> {
  static constexpr float kAbsorb = 16.0f;
  static constexpr float kLow = 1e-15f, kHigh = 1e15f;
};
template <>
struct StabilisedRange<double> {
  static constexpr double kAbsorb = 64.0;
  static constexpr double kLow = 1e-100, kHigh = 1e100;
};

// 2^y for any y (ExpTerm's polynomial with the argument clamped above, so that an
// overflowing entry reads +inf, not a wrapped exponent; NaN stays NaN).
template <typename T>
inline Vectorized<T> exp2_any(const Vectorized<T>& y) {
  constexpr T kTop = std::is_same_v<T, float> ? T(128) : T(1024);
  return ExpTerm<T>::apply(at::vec::minimum(y, Vectorized<T>(kTop)));
}

// k_j = exp((f_hat + g_hat_j - c_j) / eps) for j < m; `scale` = ExpTerm<T>::kScale / eps.
template <typename T>
inline void fill_relative_kernel(const T* c, T f_hat, const T* g_hat, int64_t m, T scale, T* k) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vf(f_hat), vscale(scale);
  int64_t j = 0;
  for (; j + W <= m; j += W) {
    exp2_any((vf + Vec::loadu(g_hat + j) - Vec::loadu(c + j)) * vscale).store(k + j);
  }
  if (j < m) {
    const Lanes<T> tail(m - j);
    tail.store(exp2_any((vf + tail.load(g_hat + j) - tail.load(c + j)) * vscale), k + j);
  }
}

// out_j = exp(log_w_j + (p_j - p_hat_j) / eps) for j < size: exactly 0 for padding
// (log_w = -inf), through the vector exp of ATen (full range).
template <typename T>
inline void relative_scalings(const T* log_w, const T* p, const T* p_hat, int64_t size, T eps,
                              T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec inv(T(1) / eps);
  int64_t j = 0;
  for (; j + W <= size; j += W) {
    at::vec::fmadd(Vec::loadu(p + j) - Vec::loadu(p_hat + j), inv, Vec::loadu(log_w + j))
        .exp()
        .store(out + j);
  }
  for (; j < size; ++j) out[j] = std::exp(log_w[j] + (p[j] - p_hat[j]) / eps);
}

// out[i] = p_hat[i] - eps * log(sums[i]) for i in [i0, i1), the same vector log on every
// entry (so the result of an entry does not depend on how a range was split).
template <typename T>
inline void finish_relative(const T* p_hat, const T* sums, T* out, int64_t i0, int64_t i1, T eps) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec veps(eps);
  auto value = [&](const Vec& ph, const Vec& s) { return ph - veps * s.log(); };
  int64_t i = i0;
  for (; i + W <= i1; i += W) value(Vec::loadu(p_hat + i), Vec::loadu(sums + i)).store(out + i);
  if (i < i1) {
    const Lanes<T> tail(i1 - i);
    tail.store(value(tail.load(p_hat + i), tail.fill(tail.load(sums + i), T(1))), out + i);
  }
}

template <typename T, typename For>
struct StabilisedSteps : StepsBase<T, For> {
  using Range = StabilisedRange<T>;
  T scale = T(0);        // ExpTerm<T>::kScale / eps
  T built_eps = T(0);    // eps of K~; 0: K~ not built yet
  bool have_g = false;   // whether g_seen holds an iterate yet
  int64_t rebuilds = 0;  // absorptions so far

  void prepare(T e) {
    this->eps = e;
    scale = ExpTerm<T>::kScale / e;
  }

  // f[i] = row(g)_i for i in [i0, i1) (within [0, n_eff)).
  void row(const T* g, T* f, int64_t i0, int64_t i1) {
    const int64_t m_eff = this->m_eff;
    auto& ws = this->ws;
    std::copy(g, g + m_eff, grow(ws.g_seen, m_eff));
    have_g = true;
    if (needs_rebuild(g, ws.g_hat.data(), m_eff)) rebuild(ws.f_seen.data(), g);
    T* v = ws.scal.data();
    relative_scalings(ws.log_b.data(), g, ws.g_hat.data(), m_eff, this->eps, v);
    const T* K = ws.kernel.data();
    const T* f_hat = ws.f_hat.data();
    T* sums = ws.row_top.data();
    const T e = this->eps;
    this->par(i0, i1, this->row_grain(m_eff), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) sums[i] = kernel_dot(K + i * m_eff, v, m_eff);
      finish_relative(f_hat, sums, f, r0, r1, e);
    });
    // Rows out of range: exactly, in the log domain (rare).
    const T* h = nullptr;
    for (int64_t i = i0; i < i1; ++i) {
      if (in_range(sums[i])) continue;
      if (h == nullptr) h = shifted(g, ws.log_b.data(), m_eff);
      T top, total;
      row_lse_parts(this->p.C + i * this->p.m, h, m_eff, scale, top, total);
      f[i] = -(top + e * std::log(total));
    }
  }

  // g[j] = col(f)_j for j in [j0, j1) (within [0, m_eff)).
  void col(const T* f, T* g, int64_t j0, int64_t j1) {
    const int64_t n_eff = this->n_eff, m_eff = this->m_eff;
    auto& ws = this->ws;
    std::copy(f, f + n_eff, grow(ws.f_seen, n_eff));
    if (!have_g) {  // the first half-step: no g to pair f with yet
      exact_cols(f, g, j0, j1);
      return;
    }
    if (needs_rebuild(f, ws.f_hat.data(), n_eff)) rebuild(f, ws.g_seen.data());
    T* u = ws.scal.data();
    relative_scalings(ws.log_a.data(), f, ws.f_hat.data(), n_eff, this->eps, u);
    const T* K = ws.kernel.data();
    T* sums = ws.col_sum.data();
    const T e = this->eps;
    this->for_columns(j0, j1, n_eff, [&](int64_t c0, int64_t c1) {
      kernel_cols(K, m_eff, u, n_eff, c0, c1, e, g, sums);  // g = -eps log(sums)
    });
    const T* g_hat = ws.g_hat.data();
    bool all_in_range = true;
    for (int64_t j = j0; j < j1; ++j) {
      g[j] += g_hat[j];
      all_in_range = all_in_range && in_range(sums[j]);
    }
    if (all_in_range) return;
    // Columns out of range: exactly, in the log domain, a vector of columns at a time
    // (exact_cols reuses `sums` as scratch, so test a block before recomputing it).
    constexpr int64_t W = Vectorized<T>::size();
    for (int64_t c0 = j0; c0 < j1; c0 += W) {
      const int64_t c1 = std::min(j1, c0 + W);
      bool ok = true;
      for (int64_t j = c0; j < c1; ++j) ok = ok && in_range(sums[j]);
      if (!ok) exact_cols(f, g, c0, c1);
    }
  }

  void pad_rows(const T* g, T* f, T e) {
    prepare(e);
    const auto& p = this->p;
    const T* h = shifted(g, this->ws.log_b.data(), this->m_eff);
    softmin_rows(p.C, p.m, h, this->m_eff, this->n_eff, p.n, e, scale, f,
                 this->ws.row_top.data());
  }
  void pad_cols(const T* f, T* g, T e) {
    prepare(e);
    exact_cols(f, g, this->m_eff, this->p.m);
  }

 private:
  static bool in_range(T s) { return s >= Range::kLow && s <= Range::kHigh; }

  // Whether K~ must be (re)built before potentials p are used against references p_hat.
  bool needs_rebuild(const T* p, const T* p_hat, int64_t size) const {
    if (built_eps != this->eps) return true;
    const T limit = Range::kAbsorb * this->eps;
    for (int64_t i = 0; i < size; ++i) {
      if (!(std::abs(p[i] - p_hat[i]) <= limit)) return true;  // NaN-safe
    }
    return false;
  }

  // Absorption: (f^, g^) = (f, g) and K~ = exp((f^ + g^ - C) / eps).
  void rebuild(const T* f, const T* g) {
    const int64_t n_eff = this->n_eff, m_eff = this->m_eff;
    auto& ws = this->ws;
    T* f_hat = grow(ws.f_hat, n_eff);
    T* g_hat = grow(ws.g_hat, m_eff);
    std::copy(f, f + n_eff, f_hat);
    std::copy(g, g + m_eff, g_hat);
    T* K = ws.kernel.data();
    const auto& p = this->p;
    const T s = scale;
    this->par(0, n_eff, this->row_grain(m_eff), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        fill_relative_kernel(p.C + i * p.m, f_hat[i], g_hat, m_eff, s, K + i * m_eff);
      }
    });
    built_eps = this->eps;
    ++rebuilds;
  }

  // g[j] = col(f)_j for j in [j0, j1), in the log domain (softmin.h).
  void exact_cols(const T* f, T* g, int64_t j0, int64_t j1) {
    const auto& p = this->p;
    const int64_t n_eff = this->n_eff;
    const T* k = shifted(f, this->ws.log_a.data(), n_eff);
    T* col_max = this->ws.col_max.data();
    T* col_sum = this->ws.col_sum.data();
    const T e = this->eps, s = scale;
    this->for_columns(j0, j1, n_eff, [&](int64_t c0, int64_t c1) {
      softmin_cols(p.C, p.m, k, n_eff, c0, c1, e, s, g, col_max, col_sum);
    });
  }

  // p_j + eps log w_j, the shifted potentials the log-domain kernels take.
  const T* shifted(const T* p, const T* log_w, int64_t size) {
    T* out = this->ws.shifted.data();
    for (int64_t j = 0; j < size; ++j) out[j] = p[j] + this->eps * log_w[j];
    return out;
  }
};

}  // namespace sinkhorn_ot::cpu
