// Log-domain Sinkhorn half-steps: fused, one-pass, max-rescaled log-sum-exp over the
// rows and over the columns of a row-major cost block, with no (N, M) temporaries.
//
//   row:  f_i = -eps * log sum_j exp((h_j - C_ij) / eps),  h_j = g_j + eps log b_j
//   col:  g_j = -eps * log sum_i exp((k_i - C_ij) / eps),  k_i = f_i + eps log a_i
//
// Each vector lane keeps a running maximum and a sum of exp((x - max) / eps). Elements
// come in tiles (4 vectors of a row, or 4 rows of a column vector). The first tile sets
// the maximum; a later tile costs no exponential beyond its own terms unless it raises
// the maximum of a lane, and then the sum is rescaled (one exponential per lane), which
// after the first few tiles is rare. So every element is read from memory once and
// costs one exponential, and no term can overflow: the result is as robust as a
// two-pass log-sum-exp.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include "vec_math.h"

namespace sinkhorn_ot::cpu {

// Running (max, sum) of the lanes of one vector.
template <typename T>
struct LseLanes {
  using Vec = Vectorized<T>;
  Vec max;  // always finite (>= the lowest value), never -inf: see shift()
  Vec sum;

  // Make `max` cover a tile whose lane-wise maximum is `tile_max`.
  inline void cover(const Vec& tile_max, const Vec& scale) {
    if (any_greater(tile_max, max)) {
      Vec raised = fast_max(max, tile_max);
      sum = sum * ExpTerm<T>::apply((max - raised) * scale);
      max = raised;
    }
  }

  // max * scale, the shift of the terms exp2(x * scale - shift). Inputs x = -inf
  // (padding, masked tail lanes) must give a zero term and never (-inf) - (-inf) = NaN:
  // so a lane that holds no finite x yet keeps max at the lowest finite value (not
  // -inf), and max * scale is clamped to it.
  inline Vec shift(const Vec& scale) const {
    return fast_max(max * scale, Vec(kLowest<T>));
  }
};

// Parts of the row log-sum-exp of x_j = h_j - c_j, j < m (m >= 1): the maximum `top`
// and sum_j exp((x_j - top) / eps). `scale` = ExpTerm<T>::kScale / eps.
template <typename T>
inline void row_lse_parts(const T* c, const T* h, int64_t m, T scale, T& top, T& total) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vscale(scale);
  LseLanes<T> lanes;
  auto term = [&](const Vec& x, const Vec& shift) {
    return ExpTerm<T>::apply(at::vec::fmsub(x, vscale, shift));
  };
  auto tile = [&](int64_t j, bool first) {
    const Vec x0 = Vec::loadu(h + j) - Vec::loadu(c + j);
    const Vec x1 = Vec::loadu(h + j + W) - Vec::loadu(c + j + W);
    const Vec x2 = Vec::loadu(h + j + 2 * W) - Vec::loadu(c + j + 2 * W);
    const Vec x3 = Vec::loadu(h + j + 3 * W) - Vec::loadu(c + j + 3 * W);
    const Vec tile_max = fast_max(fast_max(x0, x1), fast_max(x2, x3));
    if (first) {
      lanes.max = fast_max(tile_max, Vec(kLowest<T>));  // finite: see shift()
      lanes.sum = Vec(T(0));
    } else {
      lanes.cover(tile_max, vscale);
    }
    const Vec shift = lanes.shift(vscale);
    lanes.sum += (term(x0, shift) + term(x1, shift)) + (term(x2, shift) + term(x3, shift));
  };
  auto single = [&](int64_t j, const Vec& x) {
    if (j == 0) {
      lanes.max = fast_max(x, Vec(kLowest<T>));
      lanes.sum = Vec(T(0));
    } else {
      lanes.cover(x, vscale);
    }
    lanes.sum += term(x, lanes.shift(vscale));
  };
  int64_t j = 0;
  if (m >= 4 * W) {
    tile(0, true);
    for (j = 4 * W; j + 4 * W <= m; j += 4 * W) tile(j, false);
  }
  for (; j + W <= m; j += W) single(j, Vec::loadu(h + j) - Vec::loadu(c + j));
  if (j < m) {
    const Lanes<T> tail(m - j);
    single(j, tail.fill(tail.load(h + j) - tail.load(c + j), kMinusInf<T>));
  }
  top = reduce_max(lanes.max);
  total = reduce_sum(lanes.sum * ExpTerm<T>::apply((lanes.max - Vec(top)) * vscale));
}

// out[i] = -tau (top[i] + eps * log(out[i])) for i in [i0, i1): the softmin from the
// parts of its log-sum-exp, damped by tau (loop_rules.h: 1 for a hard marginal, exact),
// with the same vector log on every entry (so the result of an entry does not depend on
// how a range was split over threads).
template <typename T>
inline void finish_softmin(const T* top, T* out, int64_t i0, int64_t i1, T eps, T tau = T(1)) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec veps(eps), vtau(tau);
  auto softmin = [&](const Vec& t, const Vec& s) {
    return (Vec(T(0)) - (t + veps * s.log())) * vtau;
  };
  int64_t i = i0;
  for (; i + W <= i1; i += W) softmin(Vec::loadu(top + i), Vec::loadu(out + i)).store(out + i);
  if (i < i1) {
    const Lanes<T> tail(i1 - i);
    tail.store(softmin(tail.load(top + i), tail.fill(tail.load(out + i), T(1))), out + i);
  }
}

// out[i] = -eps * log sum_{j < m} exp((h_j - C_ij) / eps) for rows i in [i0, i1), where
// C_ij = C[i * ldc + j]. `top`: scratch indexed by i.
template <typename T>
inline void softmin_rows(const T* C, int64_t ldc, const T* h, int64_t m, int64_t i0, int64_t i1,
                         T eps, T scale, T* out, T* top, T tau = T(1)) {
  if (m <= 0) {
    for (int64_t i = i0; i < i1; ++i) out[i] = std::numeric_limits<T>::infinity();
    return;
  }
  for (int64_t i = i0; i < i1; ++i) row_lse_parts(C + i * ldc, h, m, scale, top[i], out[i]);
  finish_softmin(top, out, i0, i1, eps, tau);
}

// One tile of R rows of the column log-sum-exp on the lanes of one vector (kTail: only
// the lanes of `tail`, at the end of the rows).
template <int R, bool kTail, typename T>
inline void softmin_cols_step(const T* c, int64_t ldc, const Vectorized<T>* k,
                              const Vectorized<T>& vscale, T* col_max, T* col_sum, bool first,
                              const Lanes<T>& tail) {
  using Vec = Vectorized<T>;
  auto load = [&](const T* p) { return kTail ? tail.load(p) : Vec::loadu(p); };
  Vec x[R];
  for (int r = 0; r < R; ++r) x[r] = k[r] - load(c + r * ldc);
  Vec tile_max = x[0];
  for (int r = 1; r < R; ++r) tile_max = fast_max(tile_max, x[r]);
  LseLanes<T> lanes;
  if (first) {
    lanes.max = fast_max(tile_max, Vec(kLowest<T>));
    lanes.sum = Vec(T(0));
  } else {
    lanes.max = load(col_max);
    lanes.sum = load(col_sum);
    lanes.cover(tile_max, vscale);
  }
  const Vec shift = lanes.shift(vscale);
  Vec s = ExpTerm<T>::apply(at::vec::fmsub(x[0], vscale, shift));
  for (int r = 1; r < R; ++r) s += ExpTerm<T>::apply(at::vec::fmsub(x[r], vscale, shift));
  lanes.sum += s;
  if constexpr (kTail) {
    tail.store(lanes.max, col_max);
    tail.store(lanes.sum, col_sum);
  } else {
    lanes.max.store(col_max);
    lanes.sum.store(col_sum);
  }
}

// out[j] = -eps * log sum_{i < n} exp((k_i - C_ij) / eps) for j in [j0, j1), where
// C_ij = C[i * ldc + j]. The rows are streamed in order, four at a time, so the column
// reduction reads the row-major cost contiguously; per column the running maximum and
// sum live in col_max / col_sum (scratch indexed by j; only [j0, j1) is touched).
template <typename T>
inline void softmin_cols(const T* C, int64_t ldc, const T* k, int64_t n, int64_t j0, int64_t j1,
                         T eps, T scale, T* out, T* col_max, T* col_sum, T tau = T(1)) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  if (n <= 0) {
    for (int64_t j = j0; j < j1; ++j) out[j] = std::numeric_limits<T>::infinity();
    return;
  }
  const Vec vscale(scale);
  const Lanes<T> tail(std::max<int64_t>(1, (j1 - j0) % W));
  const bool has_tail = (j1 - j0) % W != 0;
  auto sweep = [&](auto rows_tag, int64_t i) {
    constexpr int R = decltype(rows_tag)::value;
    Vec kv[R];
    for (int r = 0; r < R; ++r) kv[r] = Vec(k[i + r]);
    const T* c = C + i * ldc;
    const bool first = i == 0;
    int64_t j = j0;
    for (; j + W <= j1; j += W) {
      softmin_cols_step<R, false>(c + j, ldc, kv, vscale, col_max + j, col_sum + j, first, tail);
    }
    if (has_tail) {
      softmin_cols_step<R, true>(c + j, ldc, kv, vscale, col_max + j, col_sum + j, first, tail);
    }
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) sweep(std::integral_constant<int, 4>{}, i);
  for (; i < n; ++i) sweep(std::integral_constant<int, 1>{}, i);
  for (int64_t j = j0; j < j1; ++j) out[j] = col_sum[j];
  finish_softmin(col_max, out, j0, j1, eps, tau);
}

}  // namespace sinkhorn_ot::cpu
