// Point clouds: the cost cost_scale * c(x_i, y_j) is computed on the fly from tiles of x
// and y staged in shared memory; nothing of size N * M is stored.
//
// Per iteration t (host loop, same order as the torch loop and large_solver.cu):
//   pass_kernel      f_next = row(g): "outer" points x, "inner" points y;
//   combine_kernel   (only when the inner range is split over blocks) merges the partials;
//   finalize_kernel  one block per problem: marginal violation (rules::violation_term),
//                    err, the stopping decision (rules::should_stop, per-problem `active`
//                    flags), f = f_next, n_iter += 1;
//   pass_kernel      g = col(f): the same kernel with the roles of x and y swapped (every
//                    cost is symmetric, and computed with the same operations both ways,
//                    so both passes see the same bits of C_ij), then combine_kernel.
// Before the loop: init_kernel (f = f0, log2 weights, mass, flags), norms_kernel (cosine:
// max(|x|, 1e-8) once per solve), and g = col(f0).
//
// pass_kernel: a block of 16 x 16 threads owns a tile of 64 outer points and streams the
// inner points in tiles of 64 (its whole range, or one chunk of it). Each thread holds a
// 4 x 4 register tile of pair accumulators: per dimension it reads 4 outer and 4 inner
// coordinates from shared memory (tiles stored dimension-major, row stride 65: conflict
// free) and does 16 updates, (x - y)^2 (squared / plain Euclidean) or x y (cosine, on
// coordinates divided by the norms while staging, as torch's `x / |x|` does). D is walked
// in chunks of DC dimensions (4 for D <= 4, else 16); when D <= DC the outer tile stays
// in shared memory for the whole pass. The costs of a 4 x 4 tile are then folded into
// each thread's 4 running (max, sum) log-sum-exps (base 2, online, common.cuh's Lse), or
// plain sums for the kernel form, and the 16 threads of an outer point merge by shuffles.
// Inner points past the end and padding (weight 0) carry h = -inf (log) or 0 (kernel):
// they drop out of the sums with no per-pair test. Padded outer points are computed like
// the others (the torch loop returns their potentials from the last update too).
#include "common.cuh"
#include "sinkhorn_cuda.cuh"

#include <algorithm>
#include <cmath>

namespace sinkhorn_ot_cuda {
namespace {

constexpr int kTX = 16;            // threads along the inner points of a tile
constexpr int kTY = 16;            // threads along the outer points
constexpr int kThreads = kTX * kTY;
constexpr int kRO = 4;             // outer points per thread
constexpr int kRQ = 4;             // inner points per thread (a power of two: Lse chunks)
constexpr int kTO = kTY * kRO;     // outer points per block
constexpr int kTQ = kTX * kRQ;     // inner points per tile
constexpr double kNormFloor = 1e-8;  // sinkhorn_ot.costs.cosine's eps

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
struct PassArgs {
  const T* P;     // outer points (B, NO, D)
  const T* Q;     // inner points (B, NQ, D)
  const T* pn;    // outer norms (B, NO), cosine only
  const T* qn;    // inner norms (B, NQ), cosine only
  const T* lwq;   // inner log2 weights (B, NQ); nullptr: all 0 (point_softmin's h)
  const T* pot;   // inner potential (B, NQ): g for the row pass, f for the column pass
  EpsTable<T> eps;
  const uint8_t* active;  // (B,) problems still iterating; nullptr: all
  T* out;         // (B, NO)
  T* pm;          // (B, nchunks, NO) partial max, when nchunks > 1
  T* ps;          // (B, nchunks, NO) partial sum
  int64_t B, NO, NQ, D;
  int64_t otiles, nchunks, tiles_per_chunk;
  int64_t t;
  T cost_scale;
  const T* rho;  // (B, 2) or nullptr: unbalanced problems (../loop_rules.h)
  int side;      // the damped side of this pass: 0 rows (outer x), 1 columns (outer y)
};

// Stage DC dimensions (from d0) of `count` points (from p0) into s[dd][.] (stride kTO + 1),
// zeros outside the arrays; cosine: divided by the norm.
template <typename T, Cost COST, int DC, int TILE>
__device__ __forceinline__ void stage(T (*s)[TILE + 1], const T* __restrict__ pts,
                                      const T* __restrict__ norms, int64_t p0, int64_t np,
                                      int64_t d0, int64_t D) {
  for (int e = threadIdx.x; e < TILE * DC; e += kThreads) {
    const int pl = e / DC, dd = e - pl * DC;
    const int64_t pi = p0 + pl, d = d0 + dd;
    T v = T(0);
    if (pi < np && d < D) {
      v = pts[pi * D + d];
      if (COST == Cost::Cosine) v = v / norms[pi];
    }
    s[dd][pl] = v;
  }
}

template <typename T, Cost COST>
__device__ __forceinline__ T pair_update(T acc, T x, T y) {
  if (COST == Cost::Cosine) return acc + x * y;
  const T diff = x - y;
  return acc + diff * diff;
}

template <typename T, Cost COST>
__device__ __forceinline__ T finish_cost(T acc, T scale) {
  if (COST == Cost::SqEuclidean) return scale * acc;
  if (COST == Cost::Euclidean) return scale * sqrt(acc > T(0) ? acc : T(0));
  return scale * (T(1) - acc);
}

template <typename T, Cost COST, bool KM, int DC>
__global__ void __launch_bounds__(kThreads) pass_kernel(const PassArgs<T> p) {
  __shared__ T xs[DC][kTO + 1];
  __shared__ T ys[DC][kTQ + 1];
  __shared__ T hs[kTQ];

  const int64_t per_b = p.otiles * p.nchunks;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / per_b;
  const int64_t rem = static_cast<int64_t>(blockIdx.x) - b * per_b;
  const int64_t chunk = rem / p.otiles;
  const int64_t otile = rem - chunk * p.otiles;
  if (p.active != nullptr && !p.active[b]) return;  // the whole block

  const int tx = static_cast<int>(threadIdx.x) % kTX;
  const int ty = static_cast<int>(threadIdx.x) / kTX;
  const T e = p.eps.at(b, p.t);
  const T k = static_cast<T>(kLog2e) / e;
  const int64_t o0 = otile * kTO;
  const T* Pb = p.P + b * p.NO * p.D;
  const T* Qb = p.Q + b * p.NQ * p.D;
  const T* pnb = COST == Cost::Cosine ? p.pn + b * p.NO : nullptr;
  const T* qnb = COST == Cost::Cosine ? p.qn + b * p.NQ : nullptr;
  const T* lw = p.lwq != nullptr ? p.lwq + b * p.NQ : nullptr;
  const T* pot = p.pot + b * p.NQ;
  const int64_t q_begin = chunk * p.tiles_per_chunk * kTQ;
  const int64_t q_end = min64(p.NQ, q_begin + p.tiles_per_chunk * kTQ);
  const bool resident = p.D <= DC;  // one chunk of dimensions: stage the outer tile once
  if (resident) stage<T, COST, DC, kTO>(xs, Pb, pnb, o0, p.NO, 0, p.D);

  Lse<T> acc[kRO];
#pragma unroll
  for (int r = 0; r < kRO; ++r) acc[r].init();

  for (int64_t q0 = q_begin; q0 < q_end; q0 += kTQ) {
    T dist[kRO][kRQ];
#pragma unroll
    for (int r = 0; r < kRO; ++r) {
#pragma unroll
      for (int c = 0; c < kRQ; ++c) dist[r][c] = T(0);
    }
    T hq[kRQ];
    for (int64_t d0 = 0; d0 < p.D; d0 += DC) {
      if (!resident) stage<T, COST, DC, kTO>(xs, Pb, pnb, o0, p.NO, d0, p.D);
      stage<T, COST, DC, kTQ>(ys, Qb, qnb, q0, q_end, d0, p.D);
      if (d0 == 0 && threadIdx.x < kTQ) {
        const int64_t q = q0 + threadIdx.x;
        hs[threadIdx.x] = q < q_end ? half_step_vector<T, KM>(lw ? lw[q] : T(0), pot[q], k)
                                    : (KM ? T(0) : Math<T>::neg_inf());
      }
      __syncthreads();
      if (d0 == 0) {
#pragma unroll
        for (int c = 0; c < kRQ; ++c) hq[c] = hs[tx + kTX * c];
      }
#pragma unroll
      for (int dd = 0; dd < DC; ++dd) {
        T xv[kRO], yv[kRQ];
#pragma unroll
        for (int r = 0; r < kRO; ++r) xv[r] = xs[dd][ty + kTY * r];
#pragma unroll
        for (int c = 0; c < kRQ; ++c) yv[c] = ys[dd][tx + kTX * c];
#pragma unroll
        for (int r = 0; r < kRO; ++r) {
#pragma unroll
          for (int c = 0; c < kRQ; ++c) dist[r][c] = pair_update<T, COST>(dist[r][c], xv[r], yv[c]);
        }
      }
      __syncthreads();  // xs / ys / hs are restaged next
    }
#pragma unroll
    for (int r = 0; r < kRO; ++r) {
      T v[kRQ];
#pragma unroll
      for (int c = 0; c < kRQ; ++c) {
        const T cost = finish_cost<T, COST>(dist[r][c], p.cost_scale);
        v[c] = KM ? Math<T>::exp2(-cost * k) * hq[c] : hq[c] - cost * k;
      }
      if (KM) {
        acc[r].add_terms(v);
      } else {
        acc[r].add_chunk(v);
      }
    }
  }

  // Merge the kTX threads of each outer point (lanes differing in the low 4 bits).
#pragma unroll
  for (int r = 0; r < kRO; ++r) {
#pragma unroll
    for (int off = kTX / 2; off > 0; off >>= 1) {
      const T s2 = __shfl_xor_sync(0xffffffffu, acc[r].s, off);
      if (KM) {
        acc[r].s += s2;
      } else {
        const T m2 = __shfl_xor_sync(0xffffffffu, acc[r].m, off);
        acc[r].merge(m2, s2);
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int r = 0; r < kRO; ++r) {
      const int64_t o = o0 + ty + kTY * r;
      if (o >= p.NO) continue;
      if (p.nchunks == 1) {
        p.out[b * p.NO + o] = acc[r].template finish<KM>(e, side_damping(p.rho, b, p.side, e));
      } else {
        const int64_t w = (b * p.nchunks + chunk) * p.NO + o;
        p.pm[w] = acc[r].m;
        p.ps[w] = acc[r].s;
      }
    }
  }
}

// Merge the inner chunks of each outer point, in chunk order (deterministic).
template <typename T, bool KM>
__global__ void __launch_bounds__(kThreads) combine_kernel(const PassArgs<T> p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.B * p.NO) return;
  const int64_t b = idx / p.NO, o = idx - b * p.NO;
  if (p.active != nullptr && !p.active[b]) return;
  Lse<T> acc;
  acc.init();
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t w = (b * p.nchunks + c) * p.NO + o;
    if (KM) {
      acc.s += p.ps[w];
    } else {
      acc.merge(p.pm[w], p.ps[w]);
    }
  }
  const T e = p.eps.at(b, p.t);
  p.out[idx] = acc.template finish<KM>(e, side_damping(p.rho, b, p.side, e));
}

// max(|x_i|, 1e-8) of every point of x (B * N) then y (B * M).
template <typename T>
__global__ void __launch_bounds__(kThreads) norms_kernel(const T* __restrict__ x,
                                                          const T* __restrict__ y,
                                                          T* __restrict__ nx, T* __restrict__ ny,
                                                          int64_t BN, int64_t BM, int64_t D) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= BN + BM) return;
  const T* v = idx < BN ? x + idx * D : y + (idx - BN) * D;
  T s = T(0);
  for (int64_t d = 0; d < D; ++d) s += v[d] * v[d];
  const T n = sqrt(s);
  const T floor = static_cast<T>(kNormFloor);
  (idx < BN ? nx[idx] : ny[idx - BN]) = n > floor ? n : floor;
}

template <typename T>
struct FinArgs {
  const T* a;
  const T* b;
  const T* f0;
  EpsTable<T> eps;
  T* f;
  T* fn;
  T* la;  // (B, N) log2 a
  T* lb;  // (B, M) log2 b
  double* mass;
  uint8_t* active;
  int64_t* n_iter;
  double* err;
  int* alive;  // [2]: problems still iterating after finalize(t), slot t & 1
  int64_t N, M;
  int64_t t, max_iter;
  double tol;
  bool has_tol, check;
  const T* rho;  // (B, 2) or nullptr: unbalanced problems
  bool stop_potentials;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) init_kernel(const FinArgs<T> p) {
  __shared__ double red[kThreads / 32];
  const int64_t b = blockIdx.x;
  if (b == 0 && threadIdx.x == 0) p.alive[0] = p.alive[1] = 0;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < p.N; i += kThreads) {
    const T ai = p.a[b * p.N + i];
    p.f[b * p.N + i] = p.f0[b * p.N + i];
    p.la[b * p.N + i] = log2_weight(ai);
    part += static_cast<double>(ai);
  }
  for (int64_t j = threadIdx.x; j < p.M; j += kThreads) p.lb[b * p.M + j] = log2_weight(p.b[b * p.M + j]);
  const double mass = block_sum<kThreads>(part, red);
  if (threadIdx.x == 0) {
    p.mass[b] = mass;
    p.active[b] = 1;
    p.n_iter[b] = 0;
    p.err[b] = __longlong_as_double(0x7ff8000000000000LL);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinArgs<T> p) {
  __shared__ double red[kThreads / 32];
  __shared__ int stop_s;
  const int64_t b = blockIdx.x;
  if (b == 0 && threadIdx.x == 0) p.alive[(p.t + 1) & 1] = 0;
  if (!p.active[b]) return;
  const T e = p.eps.at(b, p.t);
  T* f = p.f + b * p.N;
  const T* fn = p.fn + b * p.N;
  if (p.check && block_stop_test<kThreads>(p, b, e, red, &stop_s)) return;
  for (int64_t i = threadIdx.x; i < p.N; i += kThreads) f[i] = fn[i];
  if (threadIdx.x == 0) {
    p.n_iter[b] += 1;
    atomicAdd(p.alive + (p.t & 1), 1);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.
struct PassPlan {
  int64_t otiles, nchunks, tiles_per_chunk;
};

// Split the inner range over blocks only when the outer tiles alone leave SMs idle.
PassPlan plan_pass(int64_t B, int64_t NO, int64_t NQ, const DeviceInfo& dev) {
  PassPlan pl{};
  pl.otiles = (NO + kTO - 1) / kTO;
  const int64_t qtiles = std::max<int64_t>(1, (NQ + kTQ - 1) / kTQ);
  const int64_t base = std::max<int64_t>(1, B * pl.otiles);
  const int64_t target = static_cast<int64_t>(dev.sm_count) * 8;
  int64_t nchunks = std::clamp<int64_t>((target + base - 1) / base, 1, qtiles);
  pl.tiles_per_chunk = (qtiles + nchunks - 1) / nchunks;
  pl.nchunks = (qtiles + pl.tiles_per_chunk - 1) / pl.tiles_per_chunk;
  return pl;
}

struct PointsPlan {
  PassPlan row, col;
  size_t off_fn, off_la, off_lb, off_nx, off_ny, off_pm, off_ps, off_mass, off_active,
      off_alive;
  size_t bytes;
};

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// Carves a workspace into 256-byte aligned pieces: take(bytes) returns the next offset.
struct Carver {
  size_t off = 0;
  size_t take(size_t bytes) {
    const size_t o = off;
    off += align_up(bytes);
    return o;
  }
};

template <typename T>
PointsPlan plan_points(const PointArgs<T>& a, const DeviceInfo& dev) {
  PointsPlan pl{};
  pl.row = plan_pass(a.B, a.N, a.M, dev);
  pl.col = plan_pass(a.B, a.M, a.N, dev);
  Carver ws;
  auto take = [&](size_t bytes) { return ws.take(bytes); };
  const bool cosine = a.cost == Cost::Cosine;
  pl.off_fn = take(sizeof(T) * a.B * a.N);
  pl.off_la = take(sizeof(T) * a.B * a.N);
  pl.off_lb = take(sizeof(T) * a.B * a.M);
  pl.off_nx = take(cosine ? sizeof(T) * a.B * a.N : 0);
  pl.off_ny = take(cosine ? sizeof(T) * a.B * a.M : 0);
  const int64_t part = std::max(pl.row.nchunks > 1 ? pl.row.nchunks * a.N : 0,
                                pl.col.nchunks > 1 ? pl.col.nchunks * a.M : 0);
  pl.off_pm = take(sizeof(T) * a.B * part);
  pl.off_ps = take(sizeof(T) * a.B * part);
  pl.off_mass = take(sizeof(double) * a.B);
  pl.off_active = take(a.B);
  pl.off_alive = take(2 * sizeof(int));
  pl.bytes = ws.off;
  return pl;
}

#define SK_TRY(expr)                    \
  do {                                  \
    const cudaError_t st_ = (expr);     \
    if (st_ != cudaSuccess) return st_; \
  } while (0)

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T, Cost COST, bool KM, int DC>
cudaError_t run_pass(const PassArgs<T>& pa, cudaStream_t stream) {
  const int64_t blocks = pa.B * pa.otiles * pa.nchunks;
  pass_kernel<T, COST, KM, DC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pa);
  SK_TRY(cudaGetLastError());
  if (pa.nchunks > 1) {
    combine_kernel<T, KM><<<blocks_for(pa.B * pa.NO), kThreads, 0, stream>>>(pa);
    SK_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T, Cost COST, bool KM, int DC>
cudaError_t run_points(const PointArgs<T>& a, const DeviceInfo& dev, void* workspace,
                       cudaStream_t stream) {
  const PointsPlan pl = plan_points<T>(a, dev);
  char* ws = static_cast<char*>(workspace);
  T* fn = reinterpret_cast<T*>(ws + pl.off_fn);
  T* la = reinterpret_cast<T*>(ws + pl.off_la);
  T* lb = reinterpret_cast<T*>(ws + pl.off_lb);
  T* nx = reinterpret_cast<T*>(ws + pl.off_nx);
  T* ny = reinterpret_cast<T*>(ws + pl.off_ny);
  T* pm = reinterpret_cast<T*>(ws + pl.off_pm);
  T* ps = reinterpret_cast<T*>(ws + pl.off_ps);
  double* mass = reinterpret_cast<double*>(ws + pl.off_mass);
  uint8_t* active = reinterpret_cast<uint8_t*>(ws + pl.off_active);
  int* alive = reinterpret_cast<int*>(ws + pl.off_alive);
  const EpsTable<T> eps{a.eps_table, a.S};

  FinArgs<T> fin{};
  fin.a = a.a;
  fin.b = a.b;
  fin.f0 = a.f0;
  fin.eps = eps;
  fin.f = a.f;
  fin.fn = fn;
  fin.la = la;
  fin.lb = lb;
  fin.mass = mass;
  fin.active = active;
  fin.n_iter = a.n_iter;
  fin.err = a.err;
  fin.alive = alive;
  fin.N = a.N;
  fin.M = a.M;
  fin.max_iter = a.max_iter;
  fin.tol = a.tol;
  fin.has_tol = a.has_tol;
  fin.rho = a.rho;
  fin.stop_potentials = a.stop_potentials;

  // Row pass: outer x, inner y (h from g, b); column pass: outer y, inner x (h from f, a).
  PassArgs<T> row{};
  row.P = a.x;
  row.Q = a.y;
  row.pn = nx;
  row.qn = ny;
  row.lwq = lb;
  row.pot = a.g;
  row.eps = eps;
  row.active = active;
  row.out = fn;
  row.pm = pm;
  row.ps = ps;
  row.B = a.B;
  row.NO = a.N;
  row.NQ = a.M;
  row.D = a.D;
  row.otiles = pl.row.otiles;
  row.nchunks = pl.row.nchunks;
  row.tiles_per_chunk = pl.row.tiles_per_chunk;
  row.cost_scale = a.cost_scale;
  row.rho = a.rho;
  row.side = 0;
  PassArgs<T> col = row;
  col.side = 1;
  col.P = a.y;
  col.Q = a.x;
  col.pn = ny;
  col.qn = nx;
  col.lwq = la;
  col.pot = a.f;
  col.out = a.g;
  col.NO = a.M;
  col.NQ = a.N;
  col.otiles = pl.col.otiles;
  col.nchunks = pl.col.nchunks;
  col.tiles_per_chunk = pl.col.tiles_per_chunk;

  fin.t = 0;
  init_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(fin);
  SK_TRY(cudaGetLastError());
  if (COST == Cost::Cosine) {
    norms_kernel<T><<<blocks_for(a.B * (a.N + a.M)), kThreads, 0, stream>>>(
        a.x, a.y, nx, ny, a.B * a.N, a.B * a.M, a.D);
    SK_TRY(cudaGetLastError());
  }
  col.t = 0;  // g = col(f0) with eps_0
  SK_TRY((run_pass<T, COST, KM, DC>(col, stream)));

  // Read the number of active problems every `every` iterations, about every 150 us of
  // work (assumed ~40 pair-operations per ns; D + 16 operations per pair).
  const double iter_us = 2.0 * a.B * a.N * a.M * (a.D + 16) / 4.0e7;
  const int64_t every =
      std::clamp<int64_t>(static_cast<int64_t>(std::ceil(150.0 / std::max(iter_us, 1e-3))), 1, 32);

  for (int64_t t = 0;; ++t) {
    row.t = t;
    SK_TRY((run_pass<T, COST, KM, DC>(row, stream)));
    const bool last = t == a.max_iter;
    fin.t = t;
    fin.check = a.has_tol || last;
    finalize_kernel<T><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(fin);
    SK_TRY(cudaGetLastError());
    if (last) break;
    col.t = t;
    SK_TRY((run_pass<T, COST, KM, DC>(col, stream)));
    if (a.has_tol && (t + 1) % every == 0) {
      int n_alive = 0;
      SK_TRY(cudaMemcpyAsync(&n_alive, alive + (t & 1), sizeof(int), cudaMemcpyDeviceToHost,
                             stream));
      SK_TRY(cudaStreamSynchronize(stream));
      if (n_alive == 0) break;
    }
  }
  return cudaSuccess;
}

template <typename T, Cost COST, bool KM>
cudaError_t dispatch_dc(const PointArgs<T>& a, const DeviceInfo& dev, void* ws, cudaStream_t s) {
  return a.D <= 4 ? run_points<T, COST, KM, 4>(a, dev, ws, s)
                  : run_points<T, COST, KM, 16>(a, dev, ws, s);
}

template <typename T, bool KM>
cudaError_t dispatch_cost(const PointArgs<T>& a, const DeviceInfo& dev, void* ws, cudaStream_t s) {
  switch (a.cost) {
    case Cost::SqEuclidean:
      return dispatch_dc<T, Cost::SqEuclidean, KM>(a, dev, ws, s);
    case Cost::Euclidean:
      return dispatch_dc<T, Cost::Euclidean, KM>(a, dev, ws, s);
    case Cost::Cosine:
      return dispatch_dc<T, Cost::Cosine, KM>(a, dev, ws, s);
  }
  return cudaErrorInvalidValue;
}

// point_softmin: the row pass of solve_points on its own (h as the potential, log
// weights 0, eps as a one-column table, every problem active, no damping).
struct SoftminPlan {
  PassPlan pass;
  size_t off_nx, off_ny, off_pm, off_ps, bytes;
};

template <typename T>
SoftminPlan plan_softmin(const SoftminArgs<T>& a, const DeviceInfo& dev) {
  SoftminPlan pl{};
  pl.pass = plan_pass(a.B, a.N, a.M, dev);
  Carver ws;
  auto take = [&](size_t bytes) { return ws.take(bytes); };
  const bool cosine = a.cost == Cost::Cosine;
  pl.off_nx = take(cosine ? sizeof(T) * a.B * a.N : 0);
  pl.off_ny = take(cosine ? sizeof(T) * a.B * a.M : 0);
  const int64_t part = pl.pass.nchunks > 1 ? pl.pass.nchunks * a.N : 0;
  pl.off_pm = take(sizeof(T) * a.B * part);
  pl.off_ps = take(sizeof(T) * a.B * part);
  pl.bytes = ws.off;
  return pl;
}

template <typename T, Cost COST, int DC>
cudaError_t run_softmin(const SoftminArgs<T>& a, const DeviceInfo& dev, void* workspace,
                        cudaStream_t stream) {
  const SoftminPlan pl = plan_softmin<T>(a, dev);
  char* ws = static_cast<char*>(workspace);
  PassArgs<T> pa{};
  pa.P = a.x;
  pa.Q = a.y;
  pa.pn = reinterpret_cast<T*>(ws + pl.off_nx);
  pa.qn = reinterpret_cast<T*>(ws + pl.off_ny);
  pa.lwq = nullptr;
  pa.pot = a.h;
  pa.eps = EpsTable<T>{a.eps, 1};
  pa.active = nullptr;
  pa.out = a.out;
  pa.pm = reinterpret_cast<T*>(ws + pl.off_pm);
  pa.ps = reinterpret_cast<T*>(ws + pl.off_ps);
  pa.B = a.B;
  pa.NO = a.N;
  pa.NQ = a.M;
  pa.D = a.D;
  pa.otiles = pl.pass.otiles;
  pa.nchunks = pl.pass.nchunks;
  pa.tiles_per_chunk = pl.pass.tiles_per_chunk;
  pa.t = 0;
  pa.cost_scale = a.cost_scale;
  pa.rho = nullptr;
  pa.side = 0;
  if (COST == Cost::Cosine) {
    norms_kernel<T><<<blocks_for(a.B * (a.N + a.M)), kThreads, 0, stream>>>(
        a.x, a.y, const_cast<T*>(pa.pn), const_cast<T*>(pa.qn), a.B * a.N, a.B * a.M, a.D);
    SK_TRY(cudaGetLastError());
  }
  return run_pass<T, COST, false, DC>(pa, stream);
}

template <typename T, Cost COST>
cudaError_t softmin_dc(const SoftminArgs<T>& a, const DeviceInfo& dev, void* ws, cudaStream_t s) {
  return a.D <= 4 ? run_softmin<T, COST, 4>(a, dev, ws, s) : run_softmin<T, COST, 16>(a, dev, ws, s);
}

}  // namespace

template <typename T>
size_t softmin_workspace_bytes(const SoftminArgs<T>& args, const DeviceInfo& dev) {
  return plan_softmin<T>(args, dev).bytes;
}

template <typename T>
cudaError_t point_softmin(const SoftminArgs<T>& a, const DeviceInfo& dev, void* workspace,
                          cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if (a.M <= 0 || a.D <= 0) return cudaErrorInvalidValue;
  switch (a.cost) {
    case Cost::SqEuclidean:
      return softmin_dc<T, Cost::SqEuclidean>(a, dev, workspace, stream);
    case Cost::Euclidean:
      return softmin_dc<T, Cost::Euclidean>(a, dev, workspace, stream);
    case Cost::Cosine:
      return softmin_dc<T, Cost::Cosine>(a, dev, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
size_t points_workspace_bytes(const PointArgs<T>& args, const DeviceInfo& dev) {
  return plan_points<T>(args, dev).bytes;
}

template <typename T>
cudaError_t solve_points(const PointArgs<T>& a, const DeviceInfo& dev, void* workspace,
                         cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (a.N <= 0 || a.M <= 0 || a.D <= 0 || a.S <= 0) return cudaErrorInvalidValue;
  return a.kernel_method ? dispatch_cost<T, true>(a, dev, workspace, stream)
                         : dispatch_cost<T, false>(a, dev, workspace, stream);
}

#define SINKHORN_OT_INSTANTIATE(T)                                                      \
  template size_t points_workspace_bytes<T>(const PointArgs<T>&, const DeviceInfo&);    \
  template cudaError_t solve_points<T>(const PointArgs<T>&, const DeviceInfo&, void*, \
                                       cudaStream_t);                                   \
  template size_t softmin_workspace_bytes<T>(const SoftminArgs<T>&, const DeviceInfo&); \
  template cudaError_t point_softmin<T>(const SoftminArgs<T>&, const DeviceInfo&, void*, \
                                        cudaStream_t);

SINKHORN_OT_INSTANTIATE(float)
SINKHORN_OT_INSTANTIATE(double)
#undef SINKHORN_OT_INSTANTIATE

}  // namespace sinkhorn_ot_cuda
