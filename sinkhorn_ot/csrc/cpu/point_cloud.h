// Sinkhorn half-steps on point clouds: the cost cost_scale * c(x_i, y_j) is computed on
// the fly from the points, so nothing of size N * M is ever stored (memory O((N + M) d)).
// PointLogSteps and PointKernelSteps have the interface of the dense Steps of steps.h
// (prepare, row, col, pad_rows, pad_cols), so the one sinkhorn_loop of loop.h runs them.
//
//   log:    f_i = -eps log sum_j exp((g_j + eps log b_j - C_ij) / eps), one-pass max-rescaled
//           log-sum-exp as in softmin.h, one exponential per pair;
//   kernel: f_i = -eps log sum_j exp(-C_ij / eps) v_j, no max shift: it underflows exactly
//           like the dense kernel form (a 0 sum gives +inf, which the caller reports).
//
// The column half-step is the row half-step with the two clouds swapped. Each side is
// kept row-major (the points whose potentials are computed, one at a time) and
// packed coordinate-major in panels of 4 vectors (the points summed over, W
// consecutive ones per vector, a tile's coordinates contiguous in memory). The cost
// of one point against a vector of points is a PointCost, a template per cost kind, so
// the inner loop is branch-free:
//
//   sqeuclidean |x - y|^2, euclidean |x - y|, cosine 1 - <x, y> / (|x| |y|), norms
//   floored at 1e-8 (as sinkhorn_ot.costs). Squared distances use direct differences
//   for small d and |x|^2 + |y|^2 - 2 <x, y> (clamped at 0) for large d.
//
// Every output point is computed the same way whatever the split over threads.
//
// Pure kernel code: raw pointers, sizes, scalar type templates; no at::Tensor.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel_form.h"
#include "loop.h"
#include "problem.h"
#include "softmin.h"
#include "steps.h"

// Fully unrolls a loop of compile-time trip count, so that arrays of vectors indexed by
// its counter stay in registers (GCC otherwise keeps the micro-kernel's accumulators in
// memory when a later loop over them is not unrolled).
#if defined(__clang__)
#define SINKHORN_OT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define SINKHORN_OT_UNROLL _Pragma("GCC unroll 16")
#else
#define SINKHORN_OT_UNROLL
#endif

namespace sinkhorn_ot::cpu {

enum class CostKind { kSqEuclidean, kEuclidean, kCosine };

// Squared distances by direct differences up to this dimension, by dot products above.
inline constexpr int64_t kMaxDiffDim = 8;

// How the cost of a pair is computed from the coordinates.
enum class Form {
  kDiff,  // sum_t (q_t - p_t)^2
  kDist,  // max(|p|^2 + |q|^2 - 2 <p, q>, 0)
  kCos,   // 1 - <p, q>, of normalised points
};

// The micro-kernel tile: kTileVecs vectors of consecutive points summed over (W of them
// per vector) against a few points whose potentials are computed (PointCost::kRows).
inline constexpr int kTileVecs = 3;

// Points per panel of the packed layout: one tile's columns.
template <typename T>
inline constexpr int64_t kPanel = kTileVecs * Vectorized<T>::size();

// n rounded up to whole panels.
template <typename T>
inline int64_t padded_size(int64_t n) {
  constexpr int64_t P = kPanel<T>;
  return (n + P - 1) / P * P;
}

// One side's points: `rows` (n, d) row-major; `cols` the same packed in panels of
// kPanel points, coordinate-major within a panel (point j, coordinate t at
// (j / P) * P * d + t * P + j % P, zero-filled up to whole panels), so that a tile
// reads its coordinates contiguously, one vector load per W points and coordinate;
// `sq` (padded_size(n),) their squared norms |p|^2 (zeros past n).
template <typename T>
struct Cloud {
  const T* rows;
  const T* cols;
  const T* sq;
  int64_t n;
};

template <Form F, bool kSqrt>
struct PointCost {
  // Points p per tile: they share the vector loads of q, and rows * kTileVecs
  // accumulators plus the loads stay within the 16 vector registers of AVX2.
  static constexpr int kRows = F == Form::kDiff ? 2 : 4;
  static constexpr Form kForm = F;
  // Whether the cost is affine in the dot product <p, q>: cs * c(p, q) = beta(p) +
  // gamma(q) - alpha <p, q>, with alpha = 2 cs, beta = cs |p|^2, gamma = cs |q|^2
  // (sqeuclidean, unclamped) or alpha = cs, beta = 0, gamma = cs (cosine). Then the log
  // domain folds gamma into the potential summed over and takes beta out of the sum, so
  // a tile's dot products enter the log-sum-exp with one FMA each (tile<R, true>).
  static constexpr bool kAffine = (F == Form::kDist && !kSqrt) || F == Form::kCos;

  // The register-blocked micro-kernel: calls fold(r, c) for r < R in order, with c[k] =
  // c(p_r, q_{j + k W + lane}) for k < kTileVecs, where p_r = p + r * d (row-major,
  // squared norm p_sq[r]) and q the panel of points j.. at `panel` (squared norms from
  // q_sq, already offset by j). Accumulates over the coordinates with one FMA per (r, k)
  // from one broadcast of p_r's coordinate and kTileVecs loads of the panel, the R *
  // kTileVecs accumulators in registers; each row's costs go to `fold` as soon as they
  // are formed, so the registers of the rows already folded are free for the fold.
  // Each (r, k) entry sees the same operations whatever R: R rows only share the loads.
  // With kDots (kAffine costs only) fold gets the dot products <p_r, q_j> themselves.
  template <int R, bool kDots = false, typename T, typename Fold>
  static inline void tile(const T* p, const T* p_sq, const T* panel, const T* q_sq, int64_t d,
                          const Fold& fold) {
    using Vec = Vectorized<T>;
    constexpr int K = kTileVecs;
    constexpr int64_t W = Vec::size();
    Vec acc[R][K];
    SINKHORN_OT_UNROLL
    for (int r = 0; r < R; ++r) {
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K; ++k) acc[r][k] = Vec(T(0));
    }
    const T* col = panel;
    for (int64_t t = 0; t < d; ++t, col += kPanel<T>) {
      Vec qv[K];
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K; ++k) qv[k] = Vec::loadu(col + k * W);
      SINKHORN_OT_UNROLL
      for (int r = 0; r < R; ++r) {
        const Vec pt(p[r * d + t]);
        SINKHORN_OT_UNROLL
        for (int k = 0; k < K; ++k) {
          if constexpr (F == Form::kDiff) {
            const Vec diff = qv[k] - pt;
            acc[r][k] = at::vec::fmadd(diff, diff, acc[r][k]);
          } else {
            acc[r][k] = at::vec::fmadd(pt, qv[k], acc[r][k]);
          }
        }
      }
    }
    SINKHORN_OT_UNROLL
    for (int r = 0; r < R; ++r) {
      Vec c[K];
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K; ++k) {
        Vec v = acc[r][k];
        if constexpr (kDots) {
          static_assert(kAffine, "dot products only for costs affine in them");
        } else if constexpr (F == Form::kDist) {
          const Vec norms = Vec(p_sq[r]) + Vec::loadu(q_sq + k * W);
          v = at::vec::clamp_min(norms - Vec(T(2)) * v, Vec(T(0)));
        } else if constexpr (F == Form::kCos) {
          v = Vec(T(1)) - v;
        }
        if constexpr (kSqrt) v = v.sqrt();
        c[k] = v;
      }
      fold(r, c);
    }
  }
};

// For each of R points p_r = p + r * d: the parts of the log-sum-exp over the m points
// of q of x_j = h_j - cs * c(p_r, q_j), m >= 1: the maximum top[r] and sum_j exp((x_j -
// top) / eps) in total[r], as row_lse_parts of softmin.h. `h` holds padded_size(m)
// entries, -inf past m (so the padding of the last panel drops out); for Cost::kAffine
// it is h_j - gamma(q_j) (see PointCost), and the sum runs over h_j - gamma(q_j) + alpha
// <p_r, q_j>, beta(p_r) subtracted from top[r] at the end. R points share the loads of q.
template <typename Cost, int R, typename T>
inline void point_lse_parts(const T* p, const T* p_sq, const Cloud<T>& q, int64_t d, const T* h,
                            int64_t m, T cs, T scale, T* top, T* total) {
  using Vec = Vectorized<T>;
  constexpr int K = kTileVecs;
  constexpr int64_t W = Vec::size(), P = kPanel<T>;
  const Vec vscale(scale), vcs(cs), valpha(Cost::kForm == Form::kDist ? T(2) * cs : cs);
  LseLanes<T> lanes[R];
  auto term = [&](const Vec& x, const Vec& shift) {
    return ExpTerm<T>::apply(at::vec::fmsub(x, vscale, shift));
  };
  const T* panel = q.cols;
  for (int64_t j = 0; j < m; j += P, panel += P * d) {
    const bool first = j == 0;
    Cost::template tile<R, Cost::kAffine>(p, p_sq, panel, q.sq + j, d, [&](int r,
                                                                          const Vec (&c)[K]) {
      Vec x[K];
      Vec tile_max = Vec(kLowest<T>);  // finite: see LseLanes::shift()
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K; ++k) {
        if constexpr (Cost::kAffine) {
          x[k] = at::vec::fmadd(valpha, c[k], Vec::loadu(h + j + k * W));
        } else {
          x[k] = Vec::loadu(h + j + k * W) - vcs * c[k];
        }
        tile_max = fast_max(tile_max, x[k]);
      }
      if (first) {
        lanes[r].max = tile_max;
        lanes[r].sum = Vec(T(0));
      } else {
        lanes[r].cover(tile_max, vscale);
      }
      const Vec shift = lanes[r].shift(vscale);
      Vec s = term(x[0], shift);
      SINKHORN_OT_UNROLL
      for (int k = 1; k < K; ++k) s += term(x[k], shift);
      lanes[r].sum += s;
    });
  }
  SINKHORN_OT_UNROLL
  for (int r = 0; r < R; ++r) {
    const T lane_top = reduce_max(lanes[r].max);
    total[r] =
        reduce_sum(lanes[r].sum * ExpTerm<T>::apply((lanes[r].max - Vec(lane_top)) * vscale));
    top[r] = Cost::kAffine && Cost::kForm == Form::kDist ? lane_top - cs * p_sq[r] : lane_top;
  }
}

// For each of R points p_r = p + r * d: sum over the m points of q of exp(-cs * c(p_r,
// q_j) / eps) v_j into out[r], the kernel formed as in fill_kernel (kernel_form.h), so
// it underflows to the same zeros. `v` holds padded_size(m) entries, zeros past m; the
// kernel entries of the padding are zeroed too (an overflowing inf times 0 would read
// NaN). R points share the loads of q.
template <typename Cost, int R, typename T>
inline void point_kernel_dot(const T* p, const T* p_sq, const Cloud<T>& q, int64_t d, const T* v,
                             int64_t m, T cs, T eps, T* out) {
  using Vec = Vectorized<T>;
  constexpr int K = kTileVecs;
  constexpr int64_t W = Vec::size(), P = kPanel<T>;
  const Vec vcs(cs), veps(eps);
  auto kern = [&](const Vec& c) { return ((Vec(T(0)) - vcs * c) / veps).exp(); };
  Vec s[R][K];
  SINKHORN_OT_UNROLL
  for (int r = 0; r < R; ++r) {
    SINKHORN_OT_UNROLL
    for (int k = 0; k < K; ++k) s[r][k] = Vec(T(0));
  }
  const T* panel = q.cols;
  const int64_t full = m / P * P;
  int64_t j = 0;
  for (; j < full; j += P, panel += P * d) {
    Cost::template tile<R>(p, p_sq, panel, q.sq + j, d, [&](int r, const Vec (&c)[K]) {
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K; ++k) {
        s[r][k] = at::vec::fmadd(kern(c[k]), Vec::loadu(v + j + k * W), s[r][k]);
      }
    });
  }
  if (j < m) {
    Cost::template tile<R>(p, p_sq, panel, q.sq + j, d, [&](int r, const Vec (&c)[K]) {
      SINKHORN_OT_UNROLL
      for (int k = 0; k < K && j + k * W < m; ++k) {
        const Lanes<T> tail(std::min<int64_t>(m - j - k * W, W));
        const Vec vk = Vec::loadu(v + j + k * W);
        s[r][k] = at::vec::fmadd(tail.fill(kern(c[k]), T(0)), vk, s[r][k]);
      }
    });
  }
  SINKHORN_OT_UNROLL
  for (int r = 0; r < R; ++r) {
    Vec total = s[r][0];
    SINKHORN_OT_UNROLL
    for (int k = 1; k < K; ++k) total += s[r][k];
    out[r] = reduce_sum(total);
  }
}

// Runs fn(rows_tag, r) over the points r in [r0, r1), kRows at a time (rows_tag an
// integral_constant of the count) and the rest one by one, so that kRows points share
// the loads of the other side.
template <int kRows, typename F>
inline void for_point_groups(int64_t r0, int64_t r1, const F& fn) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) fn(std::integral_constant<int, kRows>{}, r);
  for (; r < r1; ++r) fn(std::integral_constant<int, 1>{}, r);
}

// The two clouds of a problem and the cost's scale.
template <typename T>
struct Geometry {
  Cloud<T> x, y;
  int64_t d;
  T cost_scale;
};

// One side's Cloud from its points (n, d) row-major: normalised (cosine) or not, the
// transpose and the squared norms, in the workspace vectors given.
template <typename T>
inline Cloud<T> make_cloud(const T* pts, int64_t n, int64_t d, bool normalise,
                           std::vector<T>& rows, std::vector<T>& cols, std::vector<T>& sq) {
  const T* src = pts;
  if (normalise) {
    T* r = grow(rows, n * d);
    for (int64_t i = 0; i < n; ++i) {
      T norm2 = T(0);
      for (int64_t t = 0; t < d; ++t) norm2 += pts[i * d + t] * pts[i * d + t];
      const T norm = std::max(std::sqrt(norm2), T(1e-8));
      for (int64_t t = 0; t < d; ++t) r[i * d + t] = pts[i * d + t] / norm;
    }
    src = r;
  }
  constexpr int64_t P = kPanel<T>;
  const int64_t packed = (n + P - 1) / P * P * d;
  T* c = grow(cols, packed);
  std::fill(c, c + packed, T(0));
  T* s = grow(sq, padded_size<T>(n));
  std::fill(s + n, s + padded_size<T>(n), T(0));
  for (int64_t i = 0; i < n; ++i) {
    T norm2 = T(0);
    T* dst = c + (i / P) * P * d + i % P;
    for (int64_t t = 0; t < d; ++t) {
      const T v = src[i * d + t];
      norm2 += v * v;
      dst[t * P] = v;
    }
    s[i] = norm2;
  }
  return Cloud<T>{src, c, s, n};
}

// Shared state of the two point-cloud half-step implementations.
template <typename T, typename For>
struct PointStepsBase {
  const Problem<T>& p;
  int64_t n_eff, m_eff;
  Workspace<T>& ws;
  const For& par;
  Geometry<T> geo;
  T eps = T(0);
  T tau_a = T(1), tau_b = T(1);  // damping of the row / column soft-mins (loop_rules.h)

  void set_eps(T e) {
    eps = e;
    tau_a = rules::damping(p.rho_a, e);
    tau_b = rules::damping(p.rho_b, e);
  }

  // Output points per parallel chunk when each sums over `others` points.
  int64_t grain(int64_t others) const {
    const int64_t per_point = std::max<int64_t>(others, 1) * (1 + geo.d / 8);
    return std::max<int64_t>(1, kGrainElements / per_point);
  }
};

// Log-domain half-steps on point clouds.
template <typename T, typename For, typename Cost>
struct PointLogSteps : PointStepsBase<T, For> {
  T scale = T(0);

  void prepare(T e) {
    this->set_eps(e);
    scale = ExpTerm<T>::kScale / e;
  }
  // f[i] = row(g)_i for i in [i0, i1).
  void row(const T* g, T* f, int64_t i0, int64_t i1) {
    half(this->geo.x, this->geo.y, this->ws.log_b.data(), g, this->m_eff, f,
         this->ws.row_top.data(), i0, i1, this->tau_a);
  }
  // g[j] = col(f)_j for j in [j0, j1).
  void col(const T* f, T* g, int64_t j0, int64_t j1) {
    half(this->geo.y, this->geo.x, this->ws.log_a.data(), f, this->n_eff, g,
         this->ws.col_max.data(), j0, j1, this->tau_b);
  }
  void pad_rows(const T* g, T* f, T e) {
    prepare(e);
    row(g, f, this->n_eff, this->p.n);
  }
  void pad_cols(const T* f, T* g, T e) {
    prepare(e);
    col(f, g, this->m_eff, this->p.m);
  }

 private:
  // out[r] = -eps log sum_{q < nq} exp((pot_q + eps log_w_q - C(r, q)) / eps) for the
  // points r in [r0, r1) of `mine`, summing over the first nq points of `other`.
  void half(const Cloud<T>& mine, const Cloud<T>& other, const T* log_w, const T* pot,
            int64_t nq, T* out, T* top, int64_t r0, int64_t r1, T tau) {
    if (nq <= 0) {
      for (int64_t r = r0; r < r1; ++r) out[r] = std::numeric_limits<T>::infinity();
      return;
    }
    T* h = this->ws.shifted.data();  // padded_size(nq) entries: see solve_points_problem
    const T cs_ = this->geo.cost_scale;
    for (int64_t q = 0; q < nq; ++q) {
      h[q] = pot[q] + this->eps * log_w[q];
      if constexpr (Cost::kAffine) h[q] -= Cost::kForm == Form::kDist ? cs_ * other.sq[q] : cs_;
    }
    std::fill(h + nq, h + padded_size<T>(nq), kMinusInf<T>);
    const int64_t d = this->geo.d;
    const T e = this->eps, s = scale, cs = this->geo.cost_scale;
    this->par(r0, r1, this->grain(nq), [&](int64_t a0, int64_t a1) {
      for_point_groups<Cost::kRows>(a0, a1, [&](auto rows_tag, int64_t r) {
        constexpr int R = decltype(rows_tag)::value;
        point_lse_parts<Cost, R>(mine.rows + r * d, mine.sq + r, other, d, h, nq, cs, s, top + r,
                                 out + r);
      });
      finish_softmin(top, out, a0, a1, e, tau);
    });
  }
};

// Kernel-form half-steps on point clouds: exp(-C / eps) on the fly, no max shift.
template <typename T, typename For, typename Cost>
struct PointKernelSteps : PointStepsBase<T, For> {
  void prepare(T e) { this->set_eps(e); }
  // f[i] = row(g)_i for i in [i0, i1).
  void row(const T* g, T* f, int64_t i0, int64_t i1) {
    half(this->geo.x, this->geo.y, this->ws.log_b.data(), g, this->m_eff, f, i0, i1,
         this->tau_a);
  }
  // g[j] = col(f)_j for j in [j0, j1).
  void col(const T* f, T* g, int64_t j0, int64_t j1) {
    half(this->geo.y, this->geo.x, this->ws.log_a.data(), f, this->n_eff, g, j0, j1,
         this->tau_b);
  }
  void pad_rows(const T* g, T* f, T e) {
    prepare(e);
    row(g, f, this->n_eff, this->p.n);
  }
  void pad_cols(const T* f, T* g, T e) {
    prepare(e);
    col(f, g, this->m_eff, this->p.m);
  }

 private:
  // out[r] = -eps log sum_{q < nq} exp(-C(r, q) / eps) w_q exp(pot_q / eps) for the
  // points r in [r0, r1) of `mine`.
  void half(const Cloud<T>& mine, const Cloud<T>& other, const T* log_w, const T* pot,
            int64_t nq, T* out, int64_t r0, int64_t r1, T tau) {
    T* v = this->ws.scal.data();  // padded_size(nq) entries: see solve_points_problem
    scalings(log_w, pot, nq, this->eps, v);
    std::fill(v + nq, v + padded_size<T>(nq), T(0));
    const int64_t d = this->geo.d;
    const T e = this->eps, cs = this->geo.cost_scale;
    this->par(r0, r1, this->grain(nq), [&](int64_t a0, int64_t a1) {
      for_point_groups<Cost::kRows>(a0, a1, [&](auto rows_tag, int64_t r) {
        constexpr int R = decltype(rows_tag)::value;
        point_kernel_dot<Cost, R>(mine.rows + r * d, mine.sq + r, other, d, v, nq, cs, e,
                                  out + r);
      });
      finish_neg_log(out, a0, a1, e, tau);
    });
  }
};

// Calls fn(cost) with the PointCost object of `kind` for dimension d.
template <typename F>
inline auto with_point_cost(CostKind kind, int64_t d, const F& fn) {
  const bool diff = d <= kMaxDiffDim;
  switch (kind) {
    case CostKind::kSqEuclidean:
      return diff ? fn(PointCost<Form::kDiff, false>{}) : fn(PointCost<Form::kDist, false>{});
    case CostKind::kEuclidean:
      return diff ? fn(PointCost<Form::kDiff, true>{}) : fn(PointCost<Form::kDist, true>{});
    case CostKind::kCosine:
    default:
      return fn(PointCost<Form::kCos, false>{});
  }
}

// Solve one problem on the clouds x (n, d) and y (m, d) row-major: sizes, log weights,
// the clouds' layouts, then the loop.
template <typename T, typename For>
Outcome solve_points_problem(const Problem<T>& p, const T* x, const T* y, int64_t d,
                             CostKind kind, T cost_scale, const LoopSettings& s,
                             Workspace<T>& ws, const For& par) {
  const auto sizes = prepare_problem(p, ws);
  const int64_t n_eff = sizes.first, m_eff = sizes.second;
  // The potentials summed over, shifted or scaled, fill whole panels.
  const int64_t nm_padded = padded_size<T>(std::max(p.n, p.m));
  grow(ws.shifted, nm_padded);
  grow(ws.scal, nm_padded);
  const bool normalise = kind == CostKind::kCosine;
  const Geometry<T> geo{make_cloud(x, p.n, d, normalise, ws.x_rows, ws.x_cols, ws.x_sq),
                        make_cloud(y, p.m, d, normalise, ws.y_rows, ws.y_cols, ws.y_sq), d,
                        cost_scale};
  return with_point_cost(kind, d, [&](auto cost) {
    using Cost = decltype(cost);
    if (s.method == Method::kKernel) {
      PointKernelSteps<T, For, Cost> steps{{p, n_eff, m_eff, ws, par, geo}};
      return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
    }
    PointLogSteps<T, For, Cost> steps{{p, n_eff, m_eff, ws, par, geo}};
    return sinkhorn_loop(p, s, steps, n_eff, m_eff, ws);
  });
}

}  // namespace sinkhorn_ot::cpu
