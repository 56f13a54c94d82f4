// CPU emulation of the subset of CUDA the kernels in sinkhorn_ot/csrc/cuda/*.cu use, for
// tests without a GPU. Test-only code: it lives under tests/ and is not shipped.
//
// tests/test_cuda.py::test_emulated_* compiles the kernel files as C++20 with this
// directory first on the include path (so `#include <cuda_runtime.h>` lands here), after
// rewriting `k<<<grid, block, smem, stream>>>(args)` into `emu::launch(k, grid, block,
// smem, stream, args)` and the `extern __shared__` declaration into `emu::dynamic_smem()`.
// __CUDACC__ is not defined, so csrc/loop_rules.h's SINKHORN_OT_HD is empty; __host__ and
// __device__ are empty macros here.
//
// Model: a launch runs its blocks one after another; a block runs blockDim.x std::threads
// (a pool reused across blocks). __syncthreads / __syncwarp are std::barriers; a thread that
// returns drops out of them (as exited CUDA threads do); shuffles go through per-warp slots
// between two warp barriers; `__shared__` variables become function statics, shared by the
// threads of the running block (blocks never overlap). Device memory is host memory.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

using std::isfinite;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaMemcpyKind { cudaMemcpyDeviceToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToDevice };
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

namespace emu {

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<unsigned char> smem;
};

inline thread_local dim3 tIdx, bIdx;
inline dim3 gDim, bDim;
inline thread_local Block* cur = nullptr;
inline size_t smem_bytes = 0;

inline unsigned char* dynamic_smem() {
  auto addr = reinterpret_cast<uintptr_t>(cur->smem.data());
  return reinterpret_cast<unsigned char*>((addr + 15) / 16 * 16);
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   const Args&... args) {
  if (block.x == 0 || block.x % 32 != 0 || block.x > 1024 || grid.x == 0) return cudaErrorInvalidValue;
  gDim = grid;
  bDim = block;
  const unsigned nthr = block.x, nwarps = nthr / 32;
  Block blk;
  std::barrier<> start(nthr), end(nthr);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < nthr; ++t) {
    pool.emplace_back([&, t] {
      for (unsigned b = 0; b < grid.x; ++b) {
        if (t == 0) {
          blk.bar = std::make_unique<std::barrier<>>(nthr);
          blk.warp_bars.clear();
          for (unsigned w = 0; w < nwarps; ++w) blk.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
          blk.slots.assign(32 * nwarps, 0);
          blk.smem.assign(smem + 16, 0xFF);  // poison: NaN bit patterns
        }
        start.arrive_and_wait();
        tIdx = dim3(t);
        bIdx = dim3(b);
        cur = &blk;
        kernel(args...);
        blk.bar->arrive_and_drop();
        blk.warp_bars[t / 32]->arrive_and_drop();
        end.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (emu::tIdx)
#define blockIdx (emu::bIdx)
#define gridDim (emu::gDim)
#define blockDim (emu::bDim)

inline void __syncthreads() { emu::cur->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::cur->warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint64_t* slots = emu::cur->slots.data() + 32 * warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  __syncwarp();
  bits = slots[lane ^ static_cast<unsigned>(off)];
  __syncwarp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return std::atomic_ref<T>(*const_cast<T*>(p)).load();
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

template <typename K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
