// Torch glue of the CUDA backend: checks, allocation, dispatch, registration.
//
// Adds the CUDA implementation of the op `sinkhorn_ot::solve`, whose schema is declared
// once by the CPU library (csrc/sinkhorn.cpp), which must be loaded first. The kernels
// live in small_solver.cu (one launch per batch, C in shared memory) and large_solver.cu
// (streaming row/column passes); SINKHORN_OT_CUDA_PATH=small|large forces one of them
// (for tests and benchmarks), anything else lets the problem size decide.
//
// Only c10/cuda headers and the CUDA runtime: ATen/cuda/CUDAContext.h would pull in
// cuBLAS/cuSPARSE headers, which minimal CUDA toolkits (nvcc + cudart) lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
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

void check_input(const Tensor& t, const char* name, const Tensor& C,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device() == C.device(), "sinkhorn_ot.solve (CUDA): `", name, "` is on ",
              t.device(), " but C is on ", C.device());
  TORCH_CHECK(t.scalar_type() == C.scalar_type(), "sinkhorn_ot.solve (CUDA): `", name,
              "` has dtype ", t.scalar_type(), " but C has ", C.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "sinkhorn_ot.solve (CUDA): `", name,
              "` must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> solve_cuda(
    const Tensor& C_in, const Tensor& a_in, const Tensor& b_in, const Tensor& eps_in,
    const Tensor& f0_in, const Tensor& eps0_in, int64_t anneal_steps, double eps_scaling,
    int64_t max_iter, double tol, int64_t method) {
  TORCH_CHECK(C_in.is_cuda(), "sinkhorn_ot.solve (CUDA): C must be a CUDA tensor");
  TORCH_CHECK(C_in.dim() == 3, "sinkhorn_ot.solve (CUDA): C must be (B, N, M), got ",
              C_in.sizes());
  TORCH_CHECK(C_in.scalar_type() == at::kFloat || C_in.scalar_type() == at::kDouble,
              "sinkhorn_ot.solve (CUDA): C must be float32 or float64, got ",
              C_in.scalar_type());
  TORCH_CHECK(method == 0 || method == 1, "sinkhorn_ot.solve (CUDA): method must be 0 (log) "
              "or 1 (kernel), got ", method);
  TORCH_CHECK(max_iter >= 0, "sinkhorn_ot.solve (CUDA): max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(anneal_steps >= 0, "sinkhorn_ot.solve (CUDA): anneal_steps must be >= 0, got ",
              anneal_steps);
  const int64_t B = C_in.size(0), N = C_in.size(1), M = C_in.size(2);
  check_input(a_in, "a", C_in, {B, N});
  check_input(b_in, "b", C_in, {B, M});
  check_input(eps_in, "eps", C_in, {B});
  check_input(f0_in, "f0", C_in, {B, N});
  check_input(eps0_in, "eps0", C_in, {B});

  const c10::cuda::CUDAGuard guard(C_in.device());
  const Tensor C = C_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor eps = eps_in.contiguous(), f0 = f0_in.contiguous(), eps0 = eps0_in.contiguous();
  Tensor f = at::empty({B, N}, C.options());
  Tensor g = at::empty({B, M}, C.options());
  // Every problem's n_iter and err are written by the kernels (no fill launches).
  Tensor n_iter = at::empty({B}, C.options().dtype(at::kLong));
  Tensor err = at::empty({B}, C.options().dtype(at::kDouble));
  if (B == 0) return {f, g, n_iter, err};
  TORCH_CHECK(N > 0 && M > 0, "sinkhorn_ot.solve (CUDA): empty problems (N = ", N, ", M = ", M,
              ")");

  // eps_scaling**t as Python computes it (C pow on doubles), on the host and the device.
  std::vector<double> scales(static_cast<size_t>(anneal_steps));
  for (int64_t t = 0; t < anneal_steps; ++t) scales[t] = std::pow(eps_scaling, static_cast<double>(t));
  Tensor scales_dev;
  if (anneal_steps > 0) {
    scales_dev = at::from_blob(scales.data(), {anneal_steps}, at::TensorOptions().dtype(at::kDouble))
                     .to(C.device(), /*non_blocking=*/false, /*copy=*/true);
  }

  const auto dev = device_info(C.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const char* forced = std::getenv("SINKHORN_OT_CUDA_PATH");

  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_ot_solve_cuda", [&] {
    using T = scalar_t;
    sinkhorn_ot_cuda::SolveArgs<T> args;
    args.C = C.data_ptr<T>();
    args.a = a.data_ptr<T>();
    args.b = b.data_ptr<T>();
    args.eps = eps.data_ptr<T>();
    args.eps0 = eps0.data_ptr<T>();
    args.f0 = f0.data_ptr<T>();
    args.scales = anneal_steps > 0 ? scales_dev.data_ptr<double>() : nullptr;
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
  return {f, g, n_iter, err};
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ot, CUDA, m) { m.impl("solve", &solve_cuda); }
