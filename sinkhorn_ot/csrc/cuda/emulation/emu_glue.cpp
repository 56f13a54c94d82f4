// Test-only glue: runs the CUDA solvers under the CPU emulation (see cuda_runtime.h here)
// on CPU tensors, as the op `sinkhorn_ot_emu::solve`, with the same arguments as
// `sinkhorn_ot::solve` plus the path ("small"/"large"/"auto") and a fake device
// (multiprocessor count, shared memory per block).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "sinkhorn_cuda.cuh"

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_emu(
    const Tensor& C_in, const Tensor& a_in, const Tensor& b_in, const Tensor& eps_in,
    const Tensor& f0_in, const Tensor& eps0_in, int64_t anneal_steps, double eps_scaling,
    int64_t max_iter, double tol, int64_t method, const std::string& path, int64_t sm_count,
    int64_t smem_optin) {
  TORCH_CHECK(C_in.device().is_cpu() && C_in.dim() == 3);
  const int64_t B = C_in.size(0), N = C_in.size(1), M = C_in.size(2);
  const Tensor C = C_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor eps = eps_in.contiguous(), f0 = f0_in.contiguous(), eps0 = eps0_in.contiguous();
  Tensor f = at::empty({B, N}, C.options());
  Tensor g = at::empty({B, M}, C.options());
  Tensor n_iter = at::zeros({B}, C.options().dtype(at::kLong));
  Tensor err = at::full({B}, std::nan(""), C.options().dtype(at::kDouble));
  std::vector<double> scales(static_cast<size_t>(anneal_steps));
  for (int64_t t = 0; t < anneal_steps; ++t) scales[t] = std::pow(eps_scaling, static_cast<double>(t));
  sinkhorn_ot_cuda::DeviceInfo dev;
  dev.sm_count = static_cast<int>(sm_count);
  dev.smem_optin = static_cast<int>(smem_optin);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_emu", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::SolveArgs<T> args;
    args.C = C.data_ptr<T>();
    args.a = a.data_ptr<T>();
    args.b = b.data_ptr<T>();
    args.eps = eps.data_ptr<T>();
    args.eps0 = eps0.data_ptr<T>();
    args.f0 = f0.data_ptr<T>();
    args.scales = scales.data();
    args.host_scales = scales.data();
    args.B = B;
    args.N = N;
    args.M = M;
    args.anneal_steps = anneal_steps;
    args.max_iter = max_iter;
    args.tol = tol;
    args.kernel_method = method == 1;
    args.f = f.data_ptr<T>();
    args.g = g.data_ptr<T>();
    args.n_iter = n_iter.data_ptr<int64_t>();
    args.err = err.data_ptr<double>();
    bool ok = true;
    const auto chosen = sinkhorn_ot_cuda::choose_path<T>(N, M, dev, path.c_str(), &ok);
    TORCH_CHECK(ok, "emulated solve: the problem does not fit the small path");
    int st;
    if (chosen == sinkhorn_ot_cuda::Path::Small) {
      st = sinkhorn_ot_cuda::solve_small<T>(args, dev, nullptr);
    } else {
      const size_t bytes = sinkhorn_ot_cuda::large_workspace_bytes<T>(B, N, M, dev);
      Tensor ws = at::full({static_cast<int64_t>(bytes)}, 0xFF, C.options().dtype(at::kByte));
      st = sinkhorn_ot_cuda::solve_large<T>(args, dev, ws.data_ptr(), nullptr);
    }
    TORCH_CHECK(st == 0, "emulated solve failed");
  });
  return {f, g, n_iter, err};
}

std::string chosen_path(int64_t N, int64_t M, int64_t itemsize, int64_t sm_count, int64_t smem_optin) {
  sinkhorn_ot_cuda::DeviceInfo dev;
  dev.sm_count = static_cast<int>(sm_count);
  dev.smem_optin = static_cast<int>(smem_optin);
  bool ok = true;
  const auto p = itemsize == 4 ? sinkhorn_ot_cuda::choose_path<float>(N, M, dev, "", &ok)
                               : sinkhorn_ot_cuda::choose_path<double>(N, M, dev, "", &ok);
  return p == sinkhorn_ot_cuda::Path::Small ? "small" : "large";
}

}  // namespace

TORCH_LIBRARY(sinkhorn_ot_emu, m) {
  m.def("solve(Tensor C, Tensor a, Tensor b, Tensor eps, Tensor f0, Tensor eps0, int anneal_steps, "
        "float eps_scaling, int max_iter, float tol, int method, str path, int sm_count, "
        "int smem_optin) -> (Tensor, Tensor, Tensor, Tensor)",
        &solve_emu);
  m.def("chosen_path(int N, int M, int itemsize, int sm_count, int smem_optin) -> str",
        &chosen_path);
}
