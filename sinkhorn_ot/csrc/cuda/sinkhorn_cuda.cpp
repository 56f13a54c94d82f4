// Torch glue of the CUDA backend: checks, allocation, dispatch, registration.
//
// Adds the CUDA implementations of the ops `sinkhorn_ot::solve` and
// `sinkhorn_ot::solve_points`, whose schemas are declared once by the CPU library
// (csrc/sinkhorn.cpp), which must be loaded first. The dense kernels live in
// small_solver.cu (one launch per batch, C in shared memory) and large_solver.cu
// (streaming row/column passes); SINKHORN_OT_CUDA_PATH=small|large forces one of them
// (for tests and benchmarks), anything else lets the problem size decide. The
// point-cloud kernels (cost computed on the fly) live in point_cloud_solver.cu.
//
// Only c10/cuda headers and the CUDA runtime: ATen/cuda/CUDAContext.h would pull in
// cuBLAS/cuSPARSE headers, which minimal CUDA toolkits (nvcc + cudart) lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "sinkhorn_cuda.cuh"

namespace {

using at::Tensor;

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t st = cudaDeviceGetAttribute(&value, attr, device);
  TORCH_CHECK(st == cudaSuccess, "sinkhorn_ot.solve (CUDA): cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(st));
  return value;
}

sinkhorn_ot_cuda::DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<std::pair<int, sinkhorn_ot_cuda::DeviceInfo>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : cache) {
    if (entry.first == device) return entry.second;
  }
  sinkhorn_ot_cuda::DeviceInfo info;
  info.sm_count = device_attribute(cudaDevAttrMultiProcessorCount, device);
  info.smem_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  info.max_threads_per_sm = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, device);
  cache.emplace_back(device, info);
  return info;
}

void check_input(const Tensor& t, const char* op, const char* name, const Tensor& ref,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device() == ref.device(), "sinkhorn_ot.", op, " (CUDA): `", name, "` is on ",
              t.device(), " but the problem is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sinkhorn_ot.", op, " (CUDA): `", name,
              "` has dtype ", t.scalar_type(), " but the problem has ", ref.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "sinkhorn_ot.", op, " (CUDA): `", name,
              "` must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

// "stabilised" runs the log-domain kernels on CUDA (the same iterates; the stabilised
// kernel form is a CPU implementation of them, see csrc/cpu/stabilised.h).
bool kernel_method(std::string_view method, const char* op) {
  TORCH_CHECK(method == "log" || method == "kernel" || method == "stabilised", "sinkhorn_ot.", op,
              " (CUDA): method must be 'log', 'kernel' or 'stabilised', got '", method, "'");
  return method == "kernel";
}

// The loop inputs and outputs shared by both ops; `ref` is C or x (device, dtype).
struct Loop {
  Tensor a, b, f0, eps_table, f, g, n_iter, err;
  Tensor rho;  // (B, 2) or undefined: unbalanced problems
  bool stop_potentials = false;
  int64_t B, N, M, S;
};

Loop prepare(const char* op, const Tensor& ref, int64_t B, int64_t N, int64_t M,
             const Tensor& a_in, const Tensor& b_in, const Tensor& f0_in,
             const Tensor& eps_table_in, int64_t max_iter, std::optional<double> tol,
             const std::optional<Tensor>& rho, std::string_view stop) {
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
              "sinkhorn_ot.", op, " (CUDA): inputs must be float32 or float64, got ",
              ref.scalar_type());
  TORCH_CHECK(max_iter >= 0, "sinkhorn_ot.", op, " (CUDA): max_iter must be >= 0, got ",
              max_iter);
  TORCH_CHECK(!tol.has_value() || *tol >= 0.0, "sinkhorn_ot.", op,
              " (CUDA): tol must be >= 0 or None, got ", *tol);
  TORCH_CHECK(eps_table_in.dim() == 2 && eps_table_in.size(0) == B && eps_table_in.size(1) >= 1,
              "sinkhorn_ot.", op, " (CUDA): eps_table must be (B, S) with B = ", B,
              " and S >= 1, got ", eps_table_in.sizes());
  check_input(a_in, op, "a", ref, {B, N});
  check_input(b_in, op, "b", ref, {B, M});
  check_input(f0_in, op, "f0", ref, {B, N});
  check_input(eps_table_in, op, "eps_table", ref, {B, eps_table_in.size(1)});
  if (rho.has_value()) check_input(*rho, op, "rho", ref, {B, 2});
  TORCH_CHECK(stop == "marginals" || stop == "potentials", "sinkhorn_ot.", op,
              " (CUDA): stop must be 'marginals' or 'potentials', got '", stop, "'");
  Loop l;
  if (rho.has_value()) l.rho = rho->contiguous();
  l.stop_potentials = stop == "potentials";
  l.B = B;
  l.N = N;
  l.M = M;
  l.S = eps_table_in.size(1);
  l.a = a_in.contiguous();
  l.b = b_in.contiguous();
  l.f0 = f0_in.contiguous();
  l.eps_table = eps_table_in.contiguous();
  l.f = at::empty({B, N}, ref.options());
  l.g = at::empty({B, M}, ref.options());
  // Every problem's n_iter and err are written by the kernels (no fill launches).
  l.n_iter = at::empty({B}, ref.options().dtype(at::kLong));
  l.err = at::empty({B}, ref.options().dtype(at::kDouble));
  return l;
}

template <typename T, typename Args>
void fill_loop(Args& args, const Loop& l, int64_t max_iter, std::optional<double> tol,
               bool km) {
  args.rho = l.rho.defined() ? l.rho.data_ptr<T>() : nullptr;
  args.stop_potentials = l.stop_potentials;
  args.a = l.a.data_ptr<T>();
  args.b = l.b.data_ptr<T>();
  args.f0 = l.f0.data_ptr<T>();
  args.eps_table = l.eps_table.data_ptr<T>();
  args.S = l.S;
  args.B = l.B;
  args.N = l.N;
  args.M = l.M;
  args.max_iter = max_iter;
  args.has_tol = tol.has_value();
  args.tol = tol.value_or(0.0);
  args.kernel_method = km;
  args.f = l.f.data_ptr<T>();
  args.g = l.g.data_ptr<T>();
  args.n_iter = l.n_iter.data_ptr<int64_t>();
  args.err = l.err.data_ptr<double>();
}

// Momentum (over-relaxation, csrc/loop_rules.h) runs in the CPU loop only; sinkhorn()
// solves such problems on the torch backend on a GPU.
void reject_momentum(const char* op, double momentum, bool momentum_auto) {
  TORCH_CHECK(momentum == 1.0 && !momentum_auto, "sinkhorn_ot.", op,
              " (CUDA): momentum is not implemented in the CUDA kernels (got momentum = ",
              momentum, momentum_auto ? ", auto" : "", "); use the torch backend");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_cuda(const Tensor& C_in, const Tensor& a,
                                                      const Tensor& b, const Tensor& f0,
                                                      const Tensor& eps_table, int64_t max_iter,
                                                      std::optional<double> tol,
                                                      c10::string_view method,
                                                      const std::optional<Tensor>& rho,
                                                      c10::string_view stop, double momentum,
                                                      bool momentum_auto) {
  TORCH_CHECK(C_in.is_cuda(), "sinkhorn_ot.solve (CUDA): C must be a CUDA tensor");
  reject_momentum("solve", momentum, momentum_auto);
  TORCH_CHECK(C_in.dim() == 3, "sinkhorn_ot.solve (CUDA): C must be (B, N, M), got ",
              C_in.sizes());
  const bool km = kernel_method(std::string_view(method.data(), method.size()), "solve");
  const int64_t B = C_in.size(0), N = C_in.size(1), M = C_in.size(2);
  const c10::cuda::CUDAGuard guard(C_in.device());
  Loop l = prepare("solve", C_in, B, N, M, a, b, f0, eps_table, max_iter, tol, rho,
                   std::string_view(stop.data(), stop.size()));
  if (B == 0) return {l.f, l.g, l.n_iter, l.err};
  TORCH_CHECK(N > 0 && M > 0, "sinkhorn_ot.solve (CUDA): empty problems (N = ", N, ", M = ", M,
              ")");
  const Tensor C = C_in.contiguous();
  const auto dev = device_info(C.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const char* forced = std::getenv("SINKHORN_OT_CUDA_PATH");

  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_solve_cuda", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::SolveArgs<T> args;
    fill_loop<T>(args, l, max_iter, tol, km);
    args.C = C.data_ptr<T>();
    bool ok = true;
    const auto path = sinkhorn_ot_cuda::choose_path<T>(N, M, dev, forced, &ok);
    TORCH_CHECK(ok, "sinkhorn_ot.solve (CUDA): SINKHORN_OT_CUDA_PATH=small but a (", N, ", ", M,
                ") problem does not fit in shared memory");
    cudaError_t st;
    if (path == sinkhorn_ot_cuda::Path::Small) {
      st = sinkhorn_ot_cuda::solve_small<T>(args, dev, stream);
    } else {
      const size_t bytes = sinkhorn_ot_cuda::large_workspace_bytes<T>(B, N, M, dev);
      Tensor ws = at::empty({static_cast<int64_t>(bytes)}, C.options().dtype(at::kByte));
      st = sinkhorn_ot_cuda::solve_large<T>(args, dev, ws.data_ptr(), stream);
    }
    TORCH_CHECK(st == cudaSuccess, "sinkhorn_ot.solve (CUDA) failed: ", cudaGetErrorString(st));
  });
  return {l.f, l.g, l.n_iter, l.err};
}

sinkhorn_ot_cuda::Cost parse_cost(std::string_view cost) {
  if (cost == "sqeuclidean") return sinkhorn_ot_cuda::Cost::SqEuclidean;
  if (cost == "euclidean") return sinkhorn_ot_cuda::Cost::Euclidean;
  TORCH_CHECK(cost == "cosine", "sinkhorn_ot.solve_points (CUDA): cost must be 'sqeuclidean', "
              "'euclidean' or 'cosine', got '", cost, "'");
  return sinkhorn_ot_cuda::Cost::Cosine;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_points_cuda(
    const Tensor& x_in, const Tensor& y_in, const Tensor& a, const Tensor& b, const Tensor& f0,
    const Tensor& eps_table, int64_t max_iter, std::optional<double> tol,
    c10::string_view method, c10::string_view cost, double cost_scale,
    const std::optional<Tensor>& rho, c10::string_view stop, double momentum,
    bool momentum_auto) {
  TORCH_CHECK(x_in.is_cuda(), "sinkhorn_ot.solve_points (CUDA): x must be a CUDA tensor");
  reject_momentum("solve_points", momentum, momentum_auto);
  TORCH_CHECK(x_in.dim() == 3 && y_in.dim() == 3 && x_in.size(0) == y_in.size(0) &&
                  x_in.size(2) == y_in.size(2),
              "sinkhorn_ot.solve_points (CUDA): x and y must be (B, N, D) and (B, M, D), got ",
              x_in.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(y_in.device() == x_in.device() && y_in.scalar_type() == x_in.scalar_type(),
              "sinkhorn_ot.solve_points (CUDA): y must have the device and dtype of x");
  const bool km = kernel_method(std::string_view(method.data(), method.size()), "solve_points");
  const auto c = parse_cost(std::string_view(cost.data(), cost.size()));
  const int64_t B = x_in.size(0), N = x_in.size(1), M = y_in.size(1), D = x_in.size(2);
  const c10::cuda::CUDAGuard guard(x_in.device());
  Loop l = prepare("solve_points", x_in, B, N, M, a, b, f0, eps_table, max_iter, tol, rho,
                   std::string_view(stop.data(), stop.size()));
  if (B == 0) return {l.f, l.g, l.n_iter, l.err};
  TORCH_CHECK(N > 0 && M > 0 && D > 0, "sinkhorn_ot.solve_points (CUDA): empty problems (N = ",
              N, ", M = ", M, ", D = ", D, ")");
  const Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const auto dev = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_solve_points_cuda", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::PointArgs<T> args;
    fill_loop<T>(args, l, max_iter, tol, km);
    args.x = x.data_ptr<T>();
    args.y = y.data_ptr<T>();
    args.D = D;
    args.cost = c;
    args.cost_scale = static_cast<T>(cost_scale);
    const size_t bytes = sinkhorn_ot_cuda::points_workspace_bytes<T>(args, dev);
    Tensor ws = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    const cudaError_t st = sinkhorn_ot_cuda::solve_points<T>(args, dev, ws.data_ptr(), stream);
    TORCH_CHECK(st == cudaSuccess, "sinkhorn_ot.solve_points (CUDA) failed: ",
                cudaGetErrorString(st));
  });
  return {l.f, l.g, l.n_iter, l.err};
}

// point_softmin: one row soft-min of point clouds (schema in csrc/cpu/point_softmin_cpu.cpp).
// The CUDA kernel computes every row; row_lengths (padding rows set to 0) is applied
// after it, so that both devices give the same outputs.
Tensor point_softmin_cuda(const Tensor& x_in, const Tensor& y_in, const Tensor& h_in,
                          const Tensor& eps_in, c10::string_view cost, double cost_scale,
                          const std::optional<Tensor>& row_lengths) {
  constexpr const char* kOp = "sinkhorn_ot.point_softmin (CUDA)";
  TORCH_CHECK(x_in.is_cuda(), kOp, ": x must be a CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, kOp,
              ": x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 3 && y_in.dim() == 3 && x_in.size(0) == y_in.size(0) &&
                  x_in.size(2) == y_in.size(2) && y_in.size(1) >= 1,
              kOp, ": x and y must be (B, N, D) and (B, M, D) with M >= 1, got ", x_in.sizes(),
              " and ", y_in.sizes());
  const int64_t B = x_in.size(0), N = x_in.size(1), M = y_in.size(1), D = x_in.size(2);
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(0) == B && h_in.size(1) == M, kOp,
              ": h must be (B, M), got ", h_in.sizes());
  TORCH_CHECK(eps_in.dim() == 1 && eps_in.size(0) == B, kOp, ": eps must be (B,), got ",
              eps_in.sizes());
  for (const Tensor* t : {&y_in, &h_in, &eps_in}) {
    TORCH_CHECK(t->device() == x_in.device() && t->scalar_type() == x_in.scalar_type(), kOp,
                ": y, h and eps must have the device and dtype of x");
  }
  TORCH_CHECK(D > 0, kOp, ": points must have at least one coordinate");
  if (row_lengths.has_value()) {
    TORCH_CHECK(row_lengths->dim() == 1 && row_lengths->size(0) == B &&
                    row_lengths->scalar_type() == at::kLong &&
                    row_lengths->device() == x_in.device(),
                kOp, ": row_lengths must be (B,) int64 on the device of x, got ",
                row_lengths->sizes(), " ", row_lengths->scalar_type());
  }
  const auto c = parse_cost(std::string_view(cost.data(), cost.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), h = h_in.contiguous();
  const Tensor eps = eps_in.contiguous();
  Tensor out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  const auto dev = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sinkhorn_ot_point_softmin_cuda", [&] {
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
    args.D = D;
    args.cost = c;
    args.cost_scale = static_cast<T>(cost_scale);
    const size_t bytes = sinkhorn_ot_cuda::softmin_workspace_bytes<T>(args, dev);
    Tensor ws = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    const cudaError_t st = sinkhorn_ot_cuda::point_softmin<T>(args, dev, ws.data_ptr(), stream);
    TORCH_CHECK(st == cudaSuccess, kOp, " failed: ", cudaGetErrorString(st));
  });
  if (row_lengths.has_value()) {
    const Tensor rows = at::arange(N, row_lengths->options()).unsqueeze(0);
    out.masked_fill_(rows >= row_lengths->unsqueeze(1), 0);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ot, CUDA, m) {
  m.impl("solve", &solve_cuda);
  m.impl("solve_points", &solve_points_cuda);
  m.impl("point_softmin", &point_softmin_cuda);
}
