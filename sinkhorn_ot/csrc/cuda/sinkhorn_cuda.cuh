// Interface between the torch glue (sinkhorn_cuda.cpp) and the CUDA kernels (*.cu).
// Named .cuh so that the wheel ships it (setup.cfg: csrc/cuda/*.cu, *.cuh, *.cpp).
//
// Plain C++ and the CUDA runtime only: no torch headers, so each kernel file can be
// read and compiled on its own (`nvcc -c small_solver.cu`).
//
// Semantics: the Sinkhorn loop of sinkhorn_ot/_loop.py::solve_potentials, exactly
// (same iterates up to rounding, same stopping decisions, same n_iter, err in float64).
// All pointers are device pointers to contiguous arrays of the compute type T (float or
// double) unless noted.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sinkhorn_ot_cuda {

// What the launchers need to know about the device (filled by the glue).
struct DeviceInfo {
  int sm_count = 1;
  int smem_optin = 48 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int max_threads_per_sm = 2048;
};

template <typename T>
struct SolveArgs {
  // Inputs.
  const T* C = nullptr;     // (B, N, M)
  const T* a = nullptr;     // (B, N), zeros = padding
  const T* b = nullptr;     // (B, M)
  const T* eps = nullptr;   // (B,)
  const T* eps0 = nullptr;  // (B,) start of the annealing
  const T* f0 = nullptr;    // (B, N)
  // eps_scaling**t for t < anneal_steps, computed on the host (std::pow, like Python's
  // float ** int), (anneal_steps,) float64 on the device; host_scales the same on the host.
  const double* scales = nullptr;
  const double* host_scales = nullptr;
  int64_t B = 0, N = 0, M = 0;
  int64_t anneal_steps = 0;
  int64_t max_iter = 0;
  double tol = -1.0;  // < 0: tol=None
  bool kernel_method = false;
  // Outputs.
  T* f = nullptr;             // (B, N)
  T* g = nullptr;             // (B, M)
  int64_t* n_iter = nullptr;  // (B,)
  double* err = nullptr;      // (B,)
};

enum class Path { Small, Large };

// Which implementation a problem of this shape goes to. `forced` = "small", "large" or
// empty/"auto" (the SINKHORN_OT_CUDA_PATH environment variable, read by the glue).
// Returns false in *ok if "small" was forced but the problem does not fit on chip.
template <typename T>
Path choose_path(int64_t N, int64_t M, const DeviceInfo& dev, const char* forced, bool* ok);

// Bytes of device workspace the large path needs (the small path needs none).
template <typename T>
size_t large_workspace_bytes(int64_t B, int64_t N, int64_t M, const DeviceInfo& dev);

// One launch per batch: every problem iterates on chip (C in shared memory) until it stops.
template <typename T>
cudaError_t solve_small(const SolveArgs<T>& args, const DeviceInfo& dev, cudaStream_t stream);

// Streaming kernels, one row pass and one column pass per iteration, host loop.
// `workspace` holds large_workspace_bytes() bytes (256-byte aligned).
template <typename T>
cudaError_t solve_large(const SolveArgs<T>& args, const DeviceInfo& dev, void* workspace,
                        cudaStream_t stream);

}  // namespace sinkhorn_ot_cuda
