// Torch glue of the CPU backend: checks the inputs of sinkhorn_ot::solve, allocates the
// outputs, picks how to spread the batch over threads and registers the CPU kernel.
// The kernels themselves (loop.h, softmin.h, kernel_form.h) know nothing of tensors.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "loop.h"

namespace sinkhorn_ot::cpu {
namespace {

// Splits a half-step over threads (inline when already inside a parallel region).
struct AtenFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& f) const {
    at::parallel_for(begin, end, grain, f);
  }
};

// Whole problems per thread when there are enough of them (one fork/join per solve,
// no synchronisation per half-step); otherwise one problem after the other, each
// half-step split over rows / column blocks.
bool parallel_over_batch(int64_t batch, int64_t n, int64_t m, int64_t threads) {
  if (threads <= 1 || batch <= 1) return false;
  const int64_t work = n * m;
  return batch >= 4 * threads || (batch % threads == 0 && work <= (1 << 20)) ||
         work <= (1 << 14);
}

template <typename T>
void solve_batch(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b,
                 const at::Tensor& eps, const at::Tensor& f0, const at::Tensor& eps0,
                 const LoopSettings& settings, at::Tensor& f, at::Tensor& g, at::Tensor& n_iter,
                 at::Tensor& err) {
  const int64_t batch = C.size(0), n = C.size(1), m = C.size(2);
  auto problem = [&](int64_t k) {
    return Problem<T>{C.const_data_ptr<T>() + k * n * m,
                      a.const_data_ptr<T>() + k * n,
                      b.const_data_ptr<T>() + k * m,
                      f0.const_data_ptr<T>() + k * n,
                      n,
                      m,
                      eps.const_data_ptr<T>()[k],
                      eps0.const_data_ptr<T>()[k],
                      f.mutable_data_ptr<T>() + k * n,
                      g.mutable_data_ptr<T>() + k * m};
  };
  int64_t* iters = n_iter.mutable_data_ptr<int64_t>();
  double* errs = err.mutable_data_ptr<double>();
  auto record = [&](int64_t k, const Outcome& o) {
    iters[k] = o.n_iter;
    errs[k] = o.err;
  };
  const int64_t threads = at::get_num_threads();
  if (parallel_over_batch(batch, n, m, threads)) {
    std::atomic<int64_t> next{0};  // dynamic schedule: problems stop at different times
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Workspace<T> ws;
      for (int64_t k = next++; k < batch; k = next++) {
        record(k, solve_problem(problem(k), settings, ws, SerialFor{}));
      }
    });
  } else {
    Workspace<T> ws;
    for (int64_t k = 0; k < batch; ++k) {
      record(k, solve_problem(problem(k), settings, ws, AtenFor{}));
    }
  }
}

void check_input(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 const at::Tensor& C) {
  TORCH_CHECK(t.sizes() == shape, "sinkhorn_ot::solve: `", name, "` must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == C.scalar_type(), "sinkhorn_ot::solve: `", name,
              "` must have the dtype of `C` (", C.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == C.device(), "sinkhorn_ot::solve: `", name,
              "` must be on the device of `C` (", C.device(), "), got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> solve_cpu(
    const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, const at::Tensor& eps,
    const at::Tensor& f0, const at::Tensor& eps0, int64_t anneal_steps, double eps_scaling,
    int64_t max_iter, double tol, int64_t method) {
  TORCH_CHECK(C.dim() == 3, "sinkhorn_ot::solve: `C` must have shape (B, N, M), got ",
              C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "sinkhorn_ot::solve: `C` must be float32 or float64, got ", C.scalar_type());
  TORCH_CHECK(C.device().is_cpu(), "sinkhorn_ot::solve (CPU kernel): `C` must be on the CPU");
  const int64_t batch = C.size(0), n = C.size(1), m = C.size(2);
  check_input(a, "a", {batch, n}, C);
  check_input(b, "b", {batch, m}, C);
  check_input(f0, "f0", {batch, n}, C);
  check_input(eps, "eps", {batch}, C);
  check_input(eps0, "eps0", {batch}, C);
  TORCH_CHECK(method == 0 || method == 1,
              "sinkhorn_ot::solve: `method` must be 0 (log) or 1 (kernel), got ", method);
  TORCH_CHECK(max_iter >= 0, "sinkhorn_ot::solve: `max_iter` must be >= 0, got ", max_iter);
  TORCH_CHECK(anneal_steps >= 0, "sinkhorn_ot::solve: `anneal_steps` must be >= 0, got ",
              anneal_steps);
  TORCH_CHECK(anneal_steps == 0 || (eps_scaling > 0.0 && eps_scaling < 1.0),
              "sinkhorn_ot::solve: `eps_scaling` must be in (0, 1) when annealing, got ",
              eps_scaling);

  LoopSettings settings;
  settings.anneal_steps = anneal_steps;
  settings.eps_scaling = eps_scaling;
  settings.max_iter = max_iter;
  settings.tol = tol;
  settings.method = method == 0 ? Method::kLog : Method::kKernel;

  const auto Cc = C.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const auto epsc = eps.contiguous(), f0c = f0.contiguous(), eps0c = eps0.contiguous();
  auto f = at::empty({batch, n}, C.options());
  auto g = at::empty({batch, m}, C.options());
  auto n_iter = at::empty({batch}, C.options().dtype(at::kLong));
  auto err = at::empty({batch}, C.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_solve_cpu", [&] {
    solve_batch<scalar_t>(Cc, ac, bc, epsc, f0c, eps0c, settings, f, g, n_iter, err);
  });
  return {f, g, n_iter, err};
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ot, CPU, m) { m.impl("solve", &solve_cpu); }

}  // namespace sinkhorn_ot::cpu
