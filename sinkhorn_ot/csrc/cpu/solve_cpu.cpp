// Torch glue of the CPU backend for sinkhorn_ot::solve (a dense cost): checks the
// inputs, allocates the outputs and registers the CPU kernel; the batch goes over
// threads as batch.h decides. The kernels themselves (loop.h, softmin.h,
// kernel_form.h) know nothing of tensors.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch.h"
#include "glue.h"
#include "loop.h"

namespace sinkhorn_ot::cpu {
namespace {

constexpr const char* kOp = "sinkhorn_ot::solve";

Outputs solve_cpu(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& f0, const at::Tensor& eps_table, int64_t max_iter,
                  std::optional<double> tol, std::string_view method,
                  const std::optional<at::Tensor>& rho, std::string_view stop,
                  double momentum, bool momentum_auto) {
  TORCH_CHECK(C.dim() == 3, kOp, ": `C` must have shape (B, N, M), got ", C.sizes());
  check_leading(kOp, C, "C");
  const int64_t batch = C.size(0), n = C.size(1), m = C.size(2);
  const LoopSettings settings =
      check_common(kOp, C, "C", batch, n, m, a, b, f0, eps_table, max_iter, tol, method, rho, stop,
                   momentum, momentum_auto);

  const auto Cc = C.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const auto f0c = f0.contiguous(), epsc = eps_table.contiguous();
  const at::Tensor rhoc = rho.has_value() ? rho->contiguous() : at::Tensor();
  Outputs out = empty_outputs(C, batch, n, m);
  at::Tensor &f = std::get<0>(out), &g = std::get<1>(out);
  at::Tensor &n_iter = std::get<2>(out), &err = std::get<3>(out);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_solve_cpu", [&] {
    using T = scalar_t;
    const T* cost = Cc.const_data_ptr<T>();
    run_batch<T>(batch, n * m, n_iter.mutable_data_ptr<int64_t>(),
                 err.mutable_data_ptr<double>(), [&](int64_t k, Workspace<T>& ws, auto par) {
                   return solve_problem(problem_at<T>(k, cost, ac, bc, f0c, epsc, f, g, rhoc),
                                        settings, ws, par);
                 });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ot, CPU, m) { m.impl("solve", &solve_cpu); }

}  // namespace sinkhorn_ot::cpu
