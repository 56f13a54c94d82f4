// Test-only glue: runs the CUDA solvers under the CPU emulation (cuda_runtime.h here) on
// CPU tensors, as the ops `sinkhorn_ot_emu::solve`, `sinkhorn_ot_emu::solve_points` and
// `sinkhorn_ot_emu::point_softmin`,
// with the arguments of `sinkhorn_ot::solve` / `sinkhorn_ot::solve_points`
// (csrc/sinkhorn.cpp) plus a fake device (multiprocessor count, shared memory per block)
// and, for solve, the path ("small"/"large"/"auto"), then the relaxation rho (B, 2) and
// the stopping rule of unbalanced problems. No input checks beyond the basics:
// the tests pass well-formed inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "sinkhorn_cuda.cuh"

namespace {

using at::Tensor;

struct Outputs {
  Tensor f, g, n_iter, err;
};

Outputs outputs(const Tensor& ref, int64_t B, int64_t N, int64_t M) {
  // Poisoned, so that an output the kernels fail to write shows up.
  return {at::full({B, N}, std::nan(""), ref.options()), at::full({B, M}, std::nan(""), ref.options()),
          at::full({B}, -1, ref.options().dtype(at::kLong)),
          at::full({B}, -1.0, ref.options().dtype(at::kDouble))};
}

template <typename T, typename Args>
void fill_loop(Args& args, const Tensor& a, const Tensor& b, const Tensor& f0, const Tensor& et,
               int64_t max_iter, std::optional<double> tol, const std::string& method,
               Outputs& o, const std::optional<Tensor>& rho, const std::string& stop) {
  TORCH_CHECK(stop == "marginals" || stop == "potentials", "emulated solve: bad stop ", stop);
  args.rho = rho.has_value() ? rho->data_ptr<T>() : nullptr;
  args.stop_potentials = stop == "potentials";
  TORCH_CHECK(method == "log" || method == "kernel", "emulated solve: bad method ", method);
  args.a = a.data_ptr<T>();
  args.b = b.data_ptr<T>();
  args.f0 = f0.data_ptr<T>();
  args.eps_table = et.data_ptr<T>();
  args.S = et.size(1);
  args.B = a.size(0);
  args.N = a.size(1);
  args.M = b.size(1);
  args.max_iter = max_iter;
  args.has_tol = tol.has_value();
  args.tol = tol.value_or(0.0);
  args.kernel_method = method == "kernel";
  args.f = o.f.data_ptr<T>();
  args.g = o.g.data_ptr<T>();
  args.n_iter = o.n_iter.data_ptr<int64_t>();
  args.err = o.err.data_ptr<double>();
}

sinkhorn_ot_cuda::DeviceInfo fake_device(int64_t sm_count, int64_t smem_optin) {
  sinkhorn_ot_cuda::DeviceInfo dev;
  dev.sm_count = static_cast<int>(sm_count);
  dev.smem_optin = static_cast<int>(smem_optin);
  return dev;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_emu(
    const Tensor& C_in, const Tensor& a_in, const Tensor& b_in, const Tensor& f0_in,
    const Tensor& et_in, int64_t max_iter, std::optional<double> tol, const std::string& method,
    const std::string& path, int64_t sm_count, int64_t smem_optin,
    const std::optional<Tensor>& rho_in, const std::string& stop) {
  TORCH_CHECK(C_in.device().is_cpu() && C_in.dim() == 3);
  const std::optional<Tensor> rho =
      rho_in.has_value() ? std::optional<Tensor>(rho_in->contiguous()) : std::nullopt;
  const int64_t B = C_in.size(0), N = C_in.size(1), M = C_in.size(2);
  const Tensor C = C_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor f0 = f0_in.contiguous(), et = et_in.contiguous();
  Outputs o = outputs(C, B, N, M);
  const auto dev = fake_device(sm_count, smem_optin);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_emu", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::SolveArgs<T> args;
    fill_loop<T>(args, a, b, f0, et, max_iter, tol, method, o, rho, stop);
    args.C = C.data_ptr<T>();
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
  return {o.f, o.g, o.n_iter, o.err};
}

sinkhorn_ot_cuda::Cost parse_cost(const std::string& cost) {
  if (cost == "euclidean") return sinkhorn_ot_cuda::Cost::Euclidean;
  if (cost == "cosine") return sinkhorn_ot_cuda::Cost::Cosine;
  TORCH_CHECK(cost == "sqeuclidean", "emulation: bad cost ", cost);
  return sinkhorn_ot_cuda::Cost::SqEuclidean;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_points_emu(
    const Tensor& x_in, const Tensor& y_in, const Tensor& a_in, const Tensor& b_in,
    const Tensor& f0_in, const Tensor& et_in, int64_t max_iter, std::optional<double> tol,
    const std::string& method, const std::string& cost, double cost_scale, int64_t sm_count,
    const std::optional<Tensor>& rho_in, const std::string& stop) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 3 && y_in.dim() == 3);
  const std::optional<Tensor> rho =
      rho_in.has_value() ? std::optional<Tensor>(rho_in->contiguous()) : std::nullopt;
  const int64_t B = x_in.size(0), N = x_in.size(1), M = y_in.size(1);
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), a = a_in.contiguous();
  const Tensor b = b_in.contiguous(), f0 = f0_in.contiguous(), et = et_in.contiguous();
  Outputs o = outputs(x, B, N, M);
  const auto dev = fake_device(sm_count, 48 * 1024);
  const sinkhorn_ot_cuda::Cost c = parse_cost(cost);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_emu_points", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::PointArgs<T> args;
    fill_loop<T>(args, a, b, f0, et, max_iter, tol, method, o, rho, stop);
    args.x = x.data_ptr<T>();
    args.y = y.data_ptr<T>();
    args.D = x.size(2);
    args.cost = c;
    args.cost_scale = static_cast<T>(cost_scale);
    const size_t bytes = sinkhorn_ot_cuda::points_workspace_bytes<T>(args, dev);
    Tensor ws = at::full({static_cast<int64_t>(bytes)}, 0xFF, x.options().dtype(at::kByte));
    const int st = sinkhorn_ot_cuda::solve_points<T>(args, dev, ws.data_ptr(), nullptr);
    TORCH_CHECK(st == 0, "emulated solve_points failed");
  });
  return {o.f, o.g, o.n_iter, o.err};
}

std::string chosen_path(int64_t N, int64_t M, int64_t itemsize, int64_t sm_count, int64_t smem_optin) {
  const auto dev = fake_device(sm_count, smem_optin);
  bool ok = true;
  const auto p = itemsize == 4 ? sinkhorn_ot_cuda::choose_path<float>(N, M, dev, "", &ok)
                               : sinkhorn_ot_cuda::choose_path<double>(N, M, dev, "", &ok);
  return p == sinkhorn_ot_cuda::Path::Small ? "small" : "large";
}

}  // namespace

// point_softmin under emulation: the arguments of sinkhorn_ot::point_softmin plus the
// fake device's multiprocessor count (which decides how the inner points are split).
Tensor point_softmin_emu(const Tensor& x_in, const Tensor& y_in, const Tensor& h_in,
                         const Tensor& eps_in, const std::string& cost, double cost_scale,
                         int64_t sm_count) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 3 && y_in.dim() == 3);
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), h = h_in.contiguous();
  const Tensor eps = eps_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1);
  Tensor out = at::full({B, N}, std::nan(""), x.options());  // poisoned, as outputs()
  const auto dev = fake_device(sm_count, 48 * 1024);
  const sinkhorn_ot_cuda::Cost c = parse_cost(cost);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_emu_point_softmin", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::SoftminArgs<T> args;
    args.x = x.data_ptr<T>();
    args.y = y.data_ptr<T>();
    args.h = h.data_ptr<T>();
    args.eps = eps.data_ptr<T>();
    args.out = out.data_ptr<T>();
    args.B = B;
    args.N = N;
    args.M = M;
    args.D = x.size(2);
    args.cost = c;
    args.cost_scale = static_cast<T>(cost_scale);
    const size_t bytes = sinkhorn_ot_cuda::softmin_workspace_bytes<T>(args, dev);
    Tensor ws = at::full({static_cast<int64_t>(bytes)}, 0xFF, x.options().dtype(at::kByte));
    const int st = sinkhorn_ot_cuda::point_softmin<T>(args, dev, ws.data_ptr(), nullptr);
    TORCH_CHECK(st == 0, "emulated point_softmin failed");
  });
  return out;
}

TORCH_LIBRARY(sinkhorn_ot_emu, m) {
  m.def("solve(Tensor C, Tensor a, Tensor b, Tensor f0, Tensor eps_table, int max_iter, "
        "float? tol, str method, str path, int sm_count, int smem_optin, Tensor? rho=None, "
        "str stop=\"marginals\") "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &solve_emu);
  m.def("solve_points(Tensor x, Tensor y, Tensor a, Tensor b, Tensor f0, Tensor eps_table, "
        "int max_iter, float? tol, str method, str cost, float cost_scale, int sm_count, "
        "Tensor? rho=None, str stop=\"marginals\") "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &solve_points_emu);
  m.def("point_softmin(Tensor x, Tensor y, Tensor h, Tensor eps, str cost, float cost_scale, "
        "int sm_count) -> Tensor",
        &point_softmin_emu);
  m.def("chosen_path(int N, int M, int itemsize, int sm_count, int smem_optin) -> str",
        &chosen_path);
}
