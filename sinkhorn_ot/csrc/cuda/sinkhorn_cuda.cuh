// Interface between the torch glue (sinkhorn_cuda.cpp) and the CUDA kernels (*.cu).
// Named .cuh so that the wheel ships it (setup.cfg: csrc/cuda/*.cu, *.cuh, *.cpp).
//
// Plain C++ and the CUDA runtime only: no torch headers, so each kernel file can be
// read and compiled on its own (`nvcc -c -I.. small_solver.cu`; the loop contract they
// share is ../loop_rules.h).
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

// The loop parameters shared by both ops.
template <typename T>
struct LoopArgs {
  const T* a = nullptr;          // (B, N), zeros = padding
  const T* b = nullptr;          // (B, M)
  const T* f0 = nullptr;         // (B, N)
  const T* eps_table = nullptr;  // (B, S): iteration t uses column min(t, S - 1)
  int64_t S = 1;
  int64_t B = 0, N = 0, M = 0;
  int64_t max_iter = 0;
  bool has_tol = false;  // false: tol=None, exactly max_iter iterations
  double tol = 0.0;
  bool kernel_method = false;
  // Unbalanced problems (../loop_rules.h): (rho_a, rho_b) per problem, (B, 2), inf for a
  // hard marginal; nullptr when every problem is balanced.
  const T* rho = nullptr;
  bool stop_potentials = false;  // balanced problems stop on the potentials rule too
  // Outputs.
  T* f = nullptr;             // (B, N)
  T* g = nullptr;             // (B, M)
  int64_t* n_iter = nullptr;  // (B,)
  double* err = nullptr;      // (B,)
};

// solve: a dense cost.
template <typename T>
struct SolveArgs : LoopArgs<T> {
  const T* C = nullptr;  // (B, N, M)
};

// solve_points: the cost cost_scale * c(x_i, y_j), computed on the fly.
enum class Cost { SqEuclidean, Euclidean, Cosine };

template <typename T>
struct PointArgs : LoopArgs<T> {
  const T* x = nullptr;  // (B, N, D)
  const T* y = nullptr;  // (B, M, D)
  int64_t D = 0;
  Cost cost = Cost::SqEuclidean;
  T cost_scale = T(1);
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

// Point clouds (point_cloud_solver.cu): one launch per half-iteration (tiles of x and y
// in shared memory, the cost computed on the fly), host loop as solve_large.
template <typename T>
size_t points_workspace_bytes(const PointArgs<T>& args, const DeviceInfo& dev);

template <typename T>
cudaError_t solve_points(const PointArgs<T>& args, const DeviceInfo& dev, void* workspace,
                         cudaStream_t stream);

// point_softmin (point_cloud_solver.cu): one row soft-min, one pass of solve_points,
//   out[b, i] = -eps[b] log sum_j exp((h[b, j] - cost_scale c(x[b, i], y[b, j])) / eps[b]),
// h = a potential plus eps log of its weights (-inf drops a point; a row whose every h is
// -inf gets +inf).
template <typename T>
struct SoftminArgs {
  const T* x = nullptr;    // (B, N, D)
  const T* y = nullptr;    // (B, M, D)
  const T* h = nullptr;    // (B, M)
  const T* eps = nullptr;  // (B,)
  T* out = nullptr;        // (B, N)
  int64_t B = 0, N = 0, M = 0, D = 0;
  Cost cost = Cost::SqEuclidean;
  T cost_scale = T(1);
};

template <typename T>
size_t softmin_workspace_bytes(const SoftminArgs<T>& args, const DeviceInfo& dev);

template <typename T>
cudaError_t point_softmin(const SoftminArgs<T>& args, const DeviceInfo& dev, void* workspace,
                          cudaStream_t stream);

}  // namespace sinkhorn_ot_cuda
