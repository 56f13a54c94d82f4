// sinkhorn_ot::point_softmin(x, y, h, eps, cost, cost_scale, row_lengths): one row
// soft-min of point clouds, the half-step of a Sinkhorn loop that the library's own
// loops do not run (the symmetric, averaged updates of sinkhorn_ot.sinkhorn_divergence):
//
//   out[k, i] = -eps[k] log sum_j exp((h[k, j] - cost_scale * c(x[k, i], y[k, j])) / eps[k])
//
// for x (B, N, D), y (B, M, D), h (B, M) (a potential plus eps log of its weights: -inf
// drops a point), eps (B,). The sum is the one-pass, max-rescaled log-sum-exp of the
// solve_points loop (point_lse_parts of point_cloud.h), so both give the same values
// and nothing of size N * M is stored. Declared here as a fragment of the library so
// the solve schemas in ../sinkhorn.cpp stay as they are.
//
// Ragged batches (padded clouds) cost only their real pairs: the trailing dropped points
// of y (h = -inf) are left out of the sums (they add exactly 0), and with row_lengths
// (B,) the rows i >= row_lengths[k] are not computed: they are padding, set to 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "glue.h"
#include "point_glue.h"

namespace sinkhorn_ot::cpu {
namespace {

constexpr const char* kOp = "sinkhorn_ot::point_softmin";

// One problem's clouds and shifted potential, laid out as point_lse_parts reads them.
template <typename T>
struct Prepared {
  std::vector<T> x_rows, x_cols, x_sq, y_rows, y_cols, y_sq, h;
  Cloud<T> x, y;
  int64_t m = 0;      // points of y summed over: up to the last one h keeps
  bool empty = true;  // every h is -inf: the soft-min is +inf (the vector exp of -inf
                      // is a tiny positive number, not 0, so the sum would not say so)
};

// Number of points of y up to its last one that h does not drop.
template <typename T>
int64_t kept_size(const T* h, int64_t m) {
  while (m > 0 && h[m - 1] == kMinusInf<T>) --m;
  return m;
}

template <typename T, typename Cost>
void prepare(Prepared<T>& out, const T* x, const T* y, const T* h, int64_t n, int64_t m,
             int64_t d, bool normalise, T cost_scale) {
  m = kept_size(h, m);
  out.empty = m == 0;
  if (out.empty) return;
  out.m = m;
  out.x = make_cloud(x, n, d, normalise, out.x_rows, out.x_cols, out.x_sq);
  out.y = make_cloud(y, m, d, normalise, out.y_rows, out.y_cols, out.y_sq);
  // As PointLogSteps::half: costs affine in <x, y> fold their y part into h, and the
  // last panel's padding is -inf.
  out.h.assign(padded_size<T>(m), kMinusInf<T>);
  for (int64_t j = 0; j < m; ++j) {
    T v = h[j];
    if constexpr (Cost::kAffine) v -= Cost::kForm == Form::kDist ? cost_scale * out.y.sq[j] : cost_scale;
    out.h[j] = v;
  }
}

at::Tensor point_softmin_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h,
                             const at::Tensor& eps, std::string_view cost, double cost_scale,
                             const std::optional<at::Tensor>& row_lengths) {
  check_clouds(kOp, x, y);
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  TORCH_CHECK(m >= 1, kOp, ": `y` must have at least one point, got ", y.sizes());
  check_input(kOp, h, "h", {batch, m}, x, "x");
  check_input(kOp, eps, "eps", {batch}, x, "x");
  const CostKind kind = cost_kind(kOp, cost);
  TORCH_CHECK(std::isfinite(cost_scale), kOp, ": `cost_scale` must be finite, got ", cost_scale);
  const std::vector<int64_t> lengths = checked_row_lengths(kOp, row_lengths, x);
  const auto xc = x.contiguous(), yc = y.contiguous(), hc = h.contiguous(), ec = eps.contiguous();
  at::Tensor out = at::empty({batch, n}, x.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_point_softmin_cpu", [&] {
    using T = scalar_t;
    const T* xs = xc.const_data_ptr<T>();
    const T* ys = yc.const_data_ptr<T>();
    const T* hs = hc.const_data_ptr<T>();
    const T* es = ec.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    const T cs = static_cast<T>(cost_scale);
    std::vector<T> top(batch * n);
    with_point_cost(kind, d, [&](auto cost_tag) {
      using Cost = decltype(cost_tag);
      std::vector<Prepared<T>> problems(batch);
      at::parallel_for(0, batch, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          prepare<T, Cost>(problems[k], xs + k * n * d, ys + k * m * d, hs + k * m, n, m, d,
                           kind == CostKind::kCosine, cs);
        }
      });
      // Rows of all problems in one range, so small batches of large clouds and large
      // batches of small ones both fill the threads.
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (m * (1 + d / 8)));
      at::parallel_for(0, batch * n, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t k = i0 / n; k * n < i1; ++k) {
          const int64_t r0 = std::max(i0, k * n) - k * n;
          int64_t r1 = std::min(i1, (k + 1) * n) - k * n;
          const Prepared<T>& p = problems[k];
          const T e = es[k], scale = ExpTerm<T>::kScale / e;
          T* out_k = o + k * n;
          T* top_k = top.data() + k * n;
          if (!lengths.empty() && r1 > lengths[k]) {  // padding rows: not computed
            std::fill(out_k + std::max(r0, lengths[k]), out_k + r1, T(0));
            if (r0 >= lengths[k]) continue;
            r1 = lengths[k];
          }
          if (p.empty) {
            std::fill(out_k + r0, out_k + r1, std::numeric_limits<T>::infinity());
            continue;
          }
          for_point_groups<Cost::kRows>(r0, r1, [&](auto rows_tag, int64_t r) {
            constexpr int R = decltype(rows_tag)::value;
            point_lse_parts<Cost, R>(p.x.rows + r * d, p.x.sq + r, p.y, d, p.h.data(), p.m, cs,
                                     scale, top_k + r, out_k + r);
          });
          finish_softmin(top_k, out_k, r0, r1, e);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkhorn_ot, m) {
  m.def(
      "point_softmin(Tensor x, Tensor y, Tensor h, Tensor eps, str cost, float cost_scale, "
      "Tensor? row_lengths=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(sinkhorn_ot, CPU, m) { m.impl("point_softmin", &point_softmin_cpu); }

}  // namespace sinkhorn_ot::cpu
