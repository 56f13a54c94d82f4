// Large problems: C streamed from device memory once per half-iteration, no (B, N, M)
// temporaries, no transposed copy.
//
// Per iteration t (host loop, same order as the torch loop):
//   row_kernel       f_next = row(g): one warp per row, 16-byte loads along j, online
//                    (max-rescaled) log-sum-exp per lane, then a shuffle merge.
//   finalize_kernel  one block per problem: marginal violation in float64, err, the
//                    stopping decision (device-side `active` flags), f = f_next,
//                    n_iter += 1, and the column-pass vector h_a.
//   col_kernel       g = col(f): each block owns a strip of TW columns and a chunk of rows;
//                    a warp reads TW contiguous entries of a row (16-byte loads), each
//                    thread keeps a running (max, sum) per column in registers; the warps
//                    of the block merge through shared memory, and the row chunks of a
//                    strip are merged by the last block to finish (threadfence + counter).
//                    It also writes the row-pass vector h_b for iteration t + 1.
// Stopped problems are skipped by every kernel, so iterations past the last active
// problem are no-ops: the host only reads the number of active problems every few
// iterations (never when tol is None).
//
// The column kernel walks its blocks in reverse memory order, so that it starts on the
// part of C that the row pass read last (still in L2), and the next row pass likewise.
#include "common.cuh"
#include "sinkhorn_cuda.cuh"

#include <algorithm>
#include <cmath>

namespace sinkhorn_ot_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColWarps = kThreads / 32;  // rows in flight per column block
constexpr int kRowUnroll = 4;             // vectors per lane in flight, row pass
constexpr int kColUnroll = 4;             // rows per thread in flight, column pass
// Resident blocks per SM the row kernel is compiled for: 4 (<= 64 registers) in float;
// double needs more registers per value.
template <typename T>
__host__ __device__ constexpr int row_min_blocks() {
  return sizeof(T) == 4 ? 4 : 2;
}

template <typename T>
__host__ __device__ constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));
}
template <typename T>
__host__ __device__ constexpr int tile_width() {
  return 32 * max_vec<T>();
}

template <typename T, int VEC>
struct VecType;
template <>
struct VecType<float, 1> {
  using type = float;
};
template <>
struct VecType<float, 4> {
  using type = float4;
};
template <>
struct VecType<double, 1> {
  using type = double;
};
template <>
struct VecType<double, 2> {
  using type = double2;
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, T (&out)[VEC]) {
  using V = typename VecType<T, VEC>::type;
  const V v = __ldg(reinterpret_cast<const V*>(ptr));
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = e[i];
}

template <typename T, bool KM>
__device__ __forceinline__ void combine(Lse<T>& acc, T m2, T s2) {
  if (KM) {
    acc.s += s2;
  } else {
    acc.merge(m2, s2);
  }
}

// ---------------------------------------------------------------------------------------
// Row pass: one warp per row.
template <typename T, int VEC, bool KM>
__global__ void __launch_bounds__(kThreads, row_min_blocks<T>())
    row_kernel(const T* __restrict__ C, const T* __restrict__ hg, const EpsTable<T> eps,
               const uint8_t* __restrict__ active, T* __restrict__ out, int64_t B, int64_t N,
               int64_t M, int64_t t, const T* __restrict__ rho) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= B * N) return;
  const int64_t b = row / N;
  if (!active[b]) return;
  const T e = eps.at(b, t);
  const T k = static_cast<T>(kLog2e) / e;
  const T* crow = C + row * M;
  const T* h = hg + b * M;
  Lse<T> acc;
  acc.init();
  constexpr int64_t kStep = 32 * VEC;
  for (int64_t j0 = static_cast<int64_t>(lane) * VEC; j0 < M; j0 += kStep * kRowUnroll) {
    T cv[kRowUnroll][VEC], hv[kRowUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t j = j0 + u * kStep;
      if (j < M) {
        load_vec<T, VEC>(crow + j, cv[u]);
        load_vec<T, VEC>(h + j, hv[u]);
      }
    }
    // All loads are in flight above; fold each vector as its own chunk (fewer values
    // live at once than one chunk of kRowUnroll * VEC: no spills under 64 registers).
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const bool valid = j0 + u * kStep < M;  // M % VEC == 0: whole vectors
      T x[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (KM) {
          x[v] = valid ? Math<T>::exp2(-cv[u][v] * k) * hv[u][v] : T(0);
        } else {
          x[v] = valid ? hv[u][v] - cv[u][v] * k : Math<T>::neg_inf();
        }
      }
      if (KM) {
        acc.add_terms(x);
      } else {
        acc.add_chunk(x);
      }
    }
  }
  warp_merge<T, KM>(acc);
  if (lane == 0) out[row] = acc.template finish<KM>(e, side_damping(rho, b, 0, e));
}

// ---------------------------------------------------------------------------------------
// Column pass: a block per (problem, strip of TW columns, chunk of rows).
template <typename T>
struct ColArgs {
  const T* C;
  const T* ha;  // (B, N) column-pass vector
  const T* b;
  EpsTable<T> eps;
  const uint8_t* active;
  T* g;
  T* hg;  // (B, M) row-pass vector for the next iteration
  T* pm;  // (B, nchunks, M) partial max
  T* ps;  // (B, nchunks, M) partial sum
  int* counters;  // (B, ntiles), zero between launches
  int64_t B, N, M;
  int64_t nchunks, rows_per_chunk, ntiles;
  int64_t t, t_next;  // eps_t for this pass, eps_{t_next} for h_b (the next row pass)
  const T* rho;       // (B, 2) or nullptr: unbalanced problems (../loop_rules.h)
};

template <typename T, bool KM>
__device__ __forceinline__ void write_column(const ColArgs<T>& p, int64_t b, int64_t j,
                                             const Lse<T>& acc, T e) {
  const T gj = acc.template finish<KM>(e, side_damping(p.rho, b, 1, e));
  p.g[b * p.M + j] = gj;
  const T e_next = p.eps.at(b, p.t_next);
  const T k_next = static_cast<T>(kLog2e) / e_next;
  p.hg[b * p.M + j] = half_step_vector<T, KM>(log2_weight(p.b[b * p.M + j]), gj, k_next);
}

template <typename T, int VEC, bool KM>
__global__ void __launch_bounds__(kThreads) col_kernel(const ColArgs<T> p) {
  constexpr int CPT = max_vec<T>();  // columns per thread
  constexpr int TW = tile_width<T>();
  __shared__ T sm[kColWarps][TW];
  __shared__ T ss[kColWarps][TW];
  __shared__ int is_last;

  // Reverse order: start where the row pass ended.
  const int64_t idx = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t per_b = p.ntiles * p.nchunks;
  const int64_t b = idx / per_b;
  const int64_t rem = idx - b * per_b;
  const int64_t chunk = rem / p.ntiles;
  const int64_t tile = rem - chunk * p.ntiles;
  if (!p.active[b]) return;

  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const T e = p.eps.at(b, p.t);
  const T k = static_cast<T>(kLog2e) / e;
  const int64_t jt = tile * TW;  // first column of the strip
  // Column (within the strip) of this thread's v-th value.
  auto col_of = [&](int v) { return VEC > 1 ? tx * VEC + v : v * 32 + tx; };
  const int64_t i_begin = chunk * p.rows_per_chunk;
  const int64_t i_end = p.N < i_begin + p.rows_per_chunk ? p.N : i_begin + p.rows_per_chunk;
  const T* Cb = p.C + b * p.N * p.M;
  const T* hb = p.ha + b * p.N;

  Lse<T> acc[CPT];
#pragma unroll
  for (int v = 0; v < CPT; ++v) acc[v].init();

  for (int64_t i = i_begin + ty; i < i_end; i += kColWarps * kColUnroll) {
    T cv[kColUnroll][CPT];
    T hval[kColUnroll];
#pragma unroll
    for (int u = 0; u < kColUnroll; ++u) {
      const int64_t ii = i + u * kColWarps;
      hval[u] = ii < i_end ? hb[ii] : (KM ? T(0) : Math<T>::neg_inf());
      if (VEC > 1) {
        if (ii < i_end && jt + tx * VEC < p.M) {
          T tmp[VEC];
          load_vec<T, VEC>(Cb + ii * p.M + jt + tx * VEC, tmp);
#pragma unroll
          for (int v = 0; v < CPT; ++v) cv[u][v] = tmp[v % VEC];
        }
      } else {
#pragma unroll
        for (int v = 0; v < CPT; ++v) {
          const int64_t j = jt + col_of(v);
          if (ii < i_end && j < p.M) cv[u][v] = __ldg(Cb + ii * p.M + j);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < CPT; ++v) {
      const bool jvalid = jt + col_of(v) < p.M;
      T x[kColUnroll];
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) {
        const bool valid = jvalid && (i + u * kColWarps < i_end);
        if (KM) {
          x[u] = valid ? Math<T>::exp2(-cv[u][v] * k) * hval[u] : T(0);
        } else {
          x[u] = valid ? hval[u] - cv[u][v] * k : Math<T>::neg_inf();
        }
      }
      if (KM) {
        acc[v].add_terms(x);
      } else {
        acc[v].add_chunk(x);
      }
    }
  }

  // Merge the warps of the block.
#pragma unroll
  for (int v = 0; v < CPT; ++v) {
    sm[ty][col_of(v)] = acc[v].m;
    ss[ty][col_of(v)] = acc[v].s;
  }
  __syncthreads();
  const int c = threadIdx.x;  // column within the strip, for the merging threads
  const int64_t j = jt + c;
  if (c < TW && j < p.M) {
    Lse<T> r;
    r.m = sm[0][c];
    r.s = ss[0][c];
    for (int w = 1; w < kColWarps; ++w) combine<T, KM>(r, sm[w][c], ss[w][c]);
    if (p.nchunks == 1) {
      write_column<T, KM>(p, b, j, r, e);
    } else {
      const int64_t o = (b * p.nchunks + chunk) * p.M + j;
      p.pm[o] = r.m;
      p.ps[o] = r.s;
    }
  }
  if (p.nchunks == 1) return;

  // The last block of the strip to finish merges the row chunks (in chunk order, so the
  // result does not depend on which block came last).
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int old = atomicAdd(p.counters + b * p.ntiles + tile, 1);
    is_last = old == p.nchunks - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (c < TW && j < p.M) {
    constexpr int kBatch = 4;  // independent loads in flight, merged in chunk order
    Lse<T> r;
    r.init();
    for (int64_t ch0 = 0; ch0 < p.nchunks; ch0 += kBatch) {
      T pm[kBatch], ps[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t o = (b * p.nchunks + ch0 + u) * p.M + j;
        const bool valid = ch0 + u < p.nchunks;
        pm[u] = valid ? __ldcg(p.pm + o) : Math<T>::neg_inf();
        ps[u] = valid ? __ldcg(p.ps + o) : T(0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) combine<T, KM>(r, pm[u], ps[u]);
    }
    write_column<T, KM>(p, b, j, r, e);
  }
  if (threadIdx.x == 0) p.counters[b * p.ntiles + tile] = 0;
}

// ---------------------------------------------------------------------------------------
// Per-problem bookkeeping.
template <typename T>
struct FinArgs {
  const T* a;
  EpsTable<T> eps;
  const T* f0;
  T* f;
  T* fn;
  T* ha;
  double* mass;
  uint8_t* active;
  int64_t* n_iter;
  double* err;
  int* alive;  // [2]: problems still iterating after finalize(t), slot t & 1
  int64_t N;
  int64_t t, max_iter;
  double tol;
  bool has_tol, check;
  const T* rho;  // (B, 2) or nullptr: unbalanced problems
  bool stop_potentials;
};

// f = f0, h_a for the first column pass, mass, flags.
template <typename T, bool KM>
__global__ void __launch_bounds__(kThreads) init_kernel(const FinArgs<T> p) {
  __shared__ double red[kThreads / 32];
  const int64_t b = blockIdx.x;
  if (b == 0 && threadIdx.x == 0) p.alive[0] = p.alive[1] = 0;
  const T e = p.eps.at(b, 0);
  const T k = static_cast<T>(kLog2e) / e;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < p.N; i += kThreads) {
    const T ai = p.a[b * p.N + i];
    const T fi = p.f0[b * p.N + i];
    p.f[b * p.N + i] = fi;
    p.ha[b * p.N + i] = half_step_vector<T, KM>(log2_weight(ai), fi, k);
    part += static_cast<double>(ai);
  }
  const double mass = block_sum<kThreads>(part, red);
  if (threadIdx.x == 0) {
    p.mass[b] = mass;
    p.active[b] = 1;
    p.n_iter[b] = 0;
    p.err[b] = __longlong_as_double(0x7ff8000000000000LL);
  }
}

template <typename T, bool KM>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinArgs<T> p) {
  __shared__ double red[kThreads / 32];
  __shared__ int stop_s;
  const int64_t b = blockIdx.x;
  if (b == 0 && threadIdx.x == 0) p.alive[(p.t + 1) & 1] = 0;
  if (!p.active[b]) return;
  const T e = p.eps.at(b, p.t);
  const T k = static_cast<T>(kLog2e) / e;
  const T* a = p.a + b * p.N;
  T* f = p.f + b * p.N;
  const T* fn = p.fn + b * p.N;
  if (p.check && block_stop_test<kThreads>(p, b, e, red, &stop_s)) return;
  T* ha = p.ha + b * p.N;
  for (int64_t i = threadIdx.x; i < p.N; i += kThreads) {
    const T v = fn[i];
    f[i] = v;
    ha[i] = half_step_vector<T, KM>(log2_weight(a[i]), v, k);
  }
  if (threadIdx.x == 0) {
    p.n_iter[b] += 1;
    atomicAdd(p.alive + (p.t & 1), 1);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.
struct LargePlan {
  int64_t ntiles, nchunks, rows_per_chunk;
  size_t off_fn, off_ha, off_hg, off_pm, off_ps, off_mass, off_active, off_counters, off_alive;
  size_t bytes;
};

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

template <typename T>
LargePlan plan_large(int64_t B, int64_t N, int64_t M, const DeviceInfo& dev) {
  LargePlan pl{};
  pl.ntiles = (M + tile_width<T>() - 1) / tile_width<T>();
  const int64_t base = std::max<int64_t>(1, B * pl.ntiles);
  // About 8 waves of (at most) 4 blocks per SM, so that the last, partial wave is short;
  // the partials cost 2 B nchunks M values, a few percent of C at most.
  const int64_t target = static_cast<int64_t>(dev.sm_count) * 32;
  const int64_t min_rows = 64;
  int64_t nchunks = std::max<int64_t>(1, (target + base - 1) / base);
  nchunks = std::min<int64_t>(nchunks, std::max<int64_t>(1, N / min_rows));
  const int64_t quantum = kColWarps * kColUnroll;
  int64_t rows = (N + nchunks - 1) / nchunks;
  rows = (rows + quantum - 1) / quantum * quantum;
  pl.rows_per_chunk = rows;
  pl.nchunks = (N + rows - 1) / rows;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t o = off;
    off += align_up(bytes);
    return o;
  };
  pl.off_fn = take(sizeof(T) * B * N);
  pl.off_ha = take(sizeof(T) * B * N);
  pl.off_hg = take(sizeof(T) * B * M);
  const size_t part = pl.nchunks > 1 ? sizeof(T) * B * pl.nchunks * M : 0;
  pl.off_pm = take(part);
  pl.off_ps = take(part);
  pl.off_mass = take(sizeof(double) * B);
  pl.off_active = take(B);
  pl.off_counters = take(sizeof(int) * B * pl.ntiles);
  pl.off_alive = take(2 * sizeof(int));
  pl.bytes = off;
  return pl;
}

#define SK_TRY(expr)                         \
  do {                                       \
    const cudaError_t st_ = (expr);          \
    if (st_ != cudaSuccess) return st_;      \
  } while (0)

template <typename T, int VEC, bool KM>
cudaError_t run_large(const SolveArgs<T>& a, const DeviceInfo& dev, void* workspace,
                      cudaStream_t stream) {
  const LargePlan pl = plan_large<T>(a.B, a.N, a.M, dev);
  char* ws = static_cast<char*>(workspace);
  T* fn = reinterpret_cast<T*>(ws + pl.off_fn);
  T* ha = reinterpret_cast<T*>(ws + pl.off_ha);
  T* hg = reinterpret_cast<T*>(ws + pl.off_hg);
  T* pm = reinterpret_cast<T*>(ws + pl.off_pm);
  T* ps = reinterpret_cast<T*>(ws + pl.off_ps);
  double* mass = reinterpret_cast<double*>(ws + pl.off_mass);
  uint8_t* active = reinterpret_cast<uint8_t*>(ws + pl.off_active);
  int* counters = reinterpret_cast<int*>(ws + pl.off_counters);
  int* alive = reinterpret_cast<int*>(ws + pl.off_alive);
  SK_TRY(cudaMemsetAsync(counters, 0, sizeof(int) * a.B * pl.ntiles, stream));

  const bool use_tol = a.has_tol;
  const EpsTable<T> eps{a.eps_table, a.S};

  FinArgs<T> fin{};
  fin.a = a.a;
  fin.eps = eps;
  fin.f0 = a.f0;
  fin.f = a.f;
  fin.fn = fn;
  fin.ha = ha;
  fin.mass = mass;
  fin.active = active;
  fin.n_iter = a.n_iter;
  fin.err = a.err;
  fin.alive = alive;
  fin.N = a.N;
  fin.max_iter = a.max_iter;
  fin.tol = a.tol;
  fin.has_tol = use_tol;
  fin.rho = a.rho;
  fin.stop_potentials = a.stop_potentials;

  ColArgs<T> col{};
  col.C = a.C;
  col.ha = ha;
  col.b = a.b;
  col.eps = eps;
  col.active = active;
  col.g = a.g;
  col.hg = hg;
  col.pm = pm;
  col.ps = ps;
  col.counters = counters;
  col.B = a.B;
  col.N = a.N;
  col.M = a.M;
  col.nchunks = pl.nchunks;
  col.rows_per_chunk = pl.rows_per_chunk;
  col.ntiles = pl.ntiles;
  col.rho = a.rho;
  const int64_t col_blocks = a.B * pl.ntiles * pl.nchunks;
  const int64_t row_blocks = (a.B * a.N + kColWarps - 1) / kColWarps;

  // g = col(f0) with eps_0; the first row pass also uses eps_0.
  fin.t = 0;
  init_kernel<T, KM><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(fin);
  SK_TRY(cudaGetLastError());
  col.t = 0;
  col.t_next = 0;
  col_kernel<T, VEC, KM><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(col);
  SK_TRY(cudaGetLastError());

  // Read the number of active problems every `every` iterations: about every 150 us of
  // streaming at ~2 TB/s, so that the synchronisation stays a few percent.
  const double iter_us = 2.0 * a.B * a.N * a.M * sizeof(T) / 2.0e6;
  const int64_t every = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(150.0 / iter_us)), 1, 32);

  for (int64_t t = 0;; ++t) {
    row_kernel<T, VEC, KM><<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(
        a.C, hg, eps, active, fn, a.B, a.N, a.M, t, a.rho);
    SK_TRY(cudaGetLastError());
    const bool last = t == a.max_iter;
    fin.t = t;
    fin.check = use_tol || last;
    finalize_kernel<T, KM><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(fin);
    SK_TRY(cudaGetLastError());
    if (last) break;
    col.t = t;
    col.t_next = t + 1;
    col_kernel<T, VEC, KM><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(col);
    SK_TRY(cudaGetLastError());
    if (use_tol && (t + 1) % every == 0) {
      int n_alive = 0;
      SK_TRY(cudaMemcpyAsync(&n_alive, alive + (t & 1), sizeof(int), cudaMemcpyDeviceToHost,
                             stream));
      SK_TRY(cudaStreamSynchronize(stream));
      if (n_alive == 0) break;
    }
  }
  return cudaSuccess;
}

template <typename T, bool KM>
cudaError_t dispatch_vec(const SolveArgs<T>& a, const DeviceInfo& dev, void* ws,
                         cudaStream_t stream) {
  constexpr int V = max_vec<T>();
  const bool aligned = reinterpret_cast<uintptr_t>(a.C) % 16 == 0 && a.M % V == 0;
  return aligned ? run_large<T, V, KM>(a, dev, ws, stream) : run_large<T, 1, KM>(a, dev, ws, stream);
}

}  // namespace

template <typename T>
size_t large_workspace_bytes(int64_t B, int64_t N, int64_t M, const DeviceInfo& dev) {
  return plan_large<T>(B, N, M, dev).bytes;
}

template <typename T>
cudaError_t solve_large(const SolveArgs<T>& a, const DeviceInfo& dev, void* workspace,
                        cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  return a.kernel_method ? dispatch_vec<T, true>(a, dev, workspace, stream)
                         : dispatch_vec<T, false>(a, dev, workspace, stream);
}

#define SINKHORN_OT_INSTANTIATE(T)                                                    \
  template size_t large_workspace_bytes<T>(int64_t, int64_t, int64_t, const DeviceInfo&); \
  template cudaError_t solve_large<T>(const SolveArgs<T>&, const DeviceInfo&, void*, cudaStream_t);

SINKHORN_OT_INSTANTIATE(float)
SINKHORN_OT_INSTANTIATE(double)
#undef SINKHORN_OT_INSTANTIATE

}  // namespace sinkhorn_ot_cuda
