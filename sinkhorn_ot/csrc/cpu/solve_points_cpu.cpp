// Torch glue of the CPU backend for sinkhorn_ot::solve_points (point clouds, the cost
// computed on the fly by point_cloud.h): checks the inputs, allocates the outputs and
// registers the CPU kernel; the batch goes over threads as batch.h decides.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "batch.h"
#include "glue.h"
#include "point_glue.h"

namespace sinkhorn_ot::cpu {
namespace {

constexpr const char* kOp = "sinkhorn_ot::solve_points";

Outputs solve_points_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                         const at::Tensor& b, const at::Tensor& f0, const at::Tensor& eps_table,
                         int64_t max_iter, std::optional<double> tol, std::string_view method,
                         std::string_view cost, double cost_scale,
                         const std::optional<at::Tensor>& rho, std::string_view stop,
                         double momentum, bool momentum_auto) {
  check_clouds(kOp, x, y);
  const int64_t batch = x.size(0), n = x.size(1), d = x.size(2), m = y.size(1);
  const LoopSettings settings =
      check_common(kOp, x, "x", batch, n, m, a, b, f0, eps_table, max_iter, tol, method, rho, stop,
                   momentum, momentum_auto);
  const CostKind kind = cost_kind(kOp, cost);
  TORCH_CHECK(std::isfinite(cost_scale), kOp, ": `cost_scale` must be finite, got ", cost_scale);

  const auto xc = x.contiguous(), yc = y.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const auto f0c = f0.contiguous(), epsc = eps_table.contiguous();
  const at::Tensor rhoc = rho.has_value() ? rho->contiguous() : at::Tensor();
  Outputs out = empty_outputs(x, batch, n, m);
  at::Tensor &f = std::get<0>(out), &g = std::get<1>(out);
  at::Tensor &n_iter = std::get<2>(out), &err = std::get<3>(out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_solve_points_cpu", [&] {
    using T = scalar_t;
    const T* xs = xc.const_data_ptr<T>();
    const T* ys = yc.const_data_ptr<T>();
    const T scale = static_cast<T>(cost_scale);
    run_batch<T>(batch, n * m * (1 + d / 8), n_iter.mutable_data_ptr<int64_t>(),
                 err.mutable_data_ptr<double>(), [&](int64_t k, Workspace<T>& ws, auto par) {
                   return solve_points_problem(
                       problem_at<T>(k, nullptr, ac, bc, f0c, epsc, f, g, rhoc), xs + k * n * d,
                       ys + k * m * d, d, kind, scale, settings, ws, par);
                 });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ot, CPU, m) { m.impl("solve_points", &solve_points_cpu); }

}  // namespace sinkhorn_ot::cpu
