// Small problems: the whole Sinkhorn loop of a problem runs on chip, in one launch.
//
// One group of threads per problem: a single warp (`WARP` mode, several problems per
// block, no block-wide barriers) or a whole block (block mode, one problem per block).
// The group copies C into shared memory once (row stride S odd, so that both a warp
// reading 32 rows at one column and a warp reading 32 consecutive columns hit 32
// different banks), then alternates the row and column log-sum-exp passes, tests the
// stopping rule itself after each row pass and writes f, g, n_iter, err at the end.
// Problems stop independently, as in the torch loop (the batch-wide "no active problem"
// break of the torch loop only skips work on stopped problems).
//
// A pass computes out[o] = -eps log sum_q exp(h_q - C_oq / eps) (in base 2) for every
// outer index o: rows for the row pass (o = i, q = j), columns for the column pass
// (o = j, q = i). RT threads are laid along o (a multiple of 32, so each warp covers 32
// consecutive o at the same q); when the group has more threads than that, CT = threads /
// RT threads split the q range of each o, and their (max, sum) partials are merged
// through shared memory.
#include "common.cuh"
#include "sinkhorn_cuda.cuh"

#include <algorithm>
#include <string_view>

namespace sinkhorn_ot_cuda {
namespace {

constexpr int kMaxWarpsPerGroup = 16;  // block mode: up to 512 threads per problem
constexpr int kWarpProblemsPerBlock = 4;
constexpr int kRedBytes = 128;  // per-group float64 reduction scratch (16 warps)
constexpr int kChunk = 8;       // inner-loop unroll: values per online-LSE update

template <typename T>
struct SmallParams {
  const T* C;
  const T* a;
  const T* b;
  const T* f0;
  EpsTable<T> eps;
  T* f;
  T* g;
  int64_t* n_iter;
  double* err;
  int64_t B;
  int N, M;
  int S;         // padded row stride of C in shared memory (odd)
  int P;         // problems per block (WARP mode), 1 otherwise
  int RTr, RTc;  // threads along the outer index, row pass / column pass
  int part;      // entries of each partial buffer
  int group_bytes;
  int64_t max_iter;
  double tol;
  bool has_tol;
  const T* rho;  // (B, 2) or nullptr: unbalanced problems (../loop_rules.h)
  bool stop_potentials;
};

template <bool WARP>
__device__ __forceinline__ void group_sync() {
  if (WARP) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Sum over the group; every thread gets the same bits (butterfly shuffles are symmetric,
// and the cross-warp sum is done in the same order by every thread). potentials: the
// maximum instead (rules::stop_combine), for the potentials stopping rule.
template <bool WARP>
__device__ __forceinline__ double group_sum(double v, double* red, int tid, int nthr,
                                            bool potentials = false) {
  v = warp_stop_reduce(v, potentials);
  if (WARP) return v;
  __syncthreads();  // red[] may still be read by the previous call
  if ((tid & 31) == 0) red[tid >> 5] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < (nthr >> 5); ++w) total = rules::stop_combine(potentials, total, red[w]);
  return total;
}

template <typename T, bool KM, bool WARP>
__device__ __forceinline__ void lse_pass(const T* __restrict__ Cs, int so, int sq, int NO, int NQ,
                                         const T* __restrict__ h, T k, T e, T* __restrict__ out,
                                         T* __restrict__ pm, T* __restrict__ ps, int tid, int nthr,
                                         int RT, T tau) {
  const int CT = nthr / RT;
  const int ro = tid % RT;
  const int cq = tid / RT;
  const int qlen = (NQ + CT - 1) / CT;
  const int q0 = cq * qlen;
  const int q1 = min(NQ, q0 + qlen);
  const int qfull = q0 + max(0, q1 - q0) / kChunk * kChunk;  // end of the whole chunks
  for (int o = ro; o < NO; o += RT) {
    Lse<T> acc;
    acc.init();
    const T* crow = Cs + o * so;
    for (int q = q0; q < qfull; q += kChunk) {  // whole chunks: no bounds tests
      T x[kChunk];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const T c = crow[(q + u) * sq];
        x[u] = KM ? Math<T>::exp2(-c * k) * h[q + u] : h[q + u] - c * k;
      }
      if (KM) {
        acc.add_terms(x);
      } else {
        acc.add_chunk(x);
      }
    }
    if (qfull < q1) {  // the tail
      T x[kChunk];
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        const int qq = qfull + u;
        if (KM) {
          x[u] = qq < q1 ? Math<T>::exp2(-crow[qq * sq] * k) * h[qq] : T(0);
        } else {
          x[u] = qq < q1 ? h[qq] - crow[qq * sq] * k : Math<T>::neg_inf();
        }
      }
      if (KM) {
        acc.add_terms(x);
      } else {
        acc.add_chunk(x);
      }
    }
    if (CT == 1) {
      out[o] = acc.template finish<KM>(e, tau);
    } else {
      pm[cq * NO + o] = acc.m;
      ps[cq * NO + o] = acc.s;
    }
  }
  if (CT > 1) {  // uniform over the group
    group_sync<WARP>();
    for (int o = tid; o < NO; o += nthr) {
      Lse<T> acc;
      acc.m = pm[o];
      acc.s = ps[o];
      for (int c = 1; c < CT; ++c) {
        if (KM) {
          acc.s += ps[c * NO + o];
        } else {
          acc.merge(pm[c * NO + o], ps[c * NO + o]);
        }
      }
      out[o] = acc.template finish<KM>(e, tau);
    }
  }
}

// Float: registers capped so that three 512-thread blocks (block mode, e.g. 128 x 128
// problems, 74 KB of shared memory each) or ten 4-warp blocks (warp mode) share an SM
// (no spills on sm_90 per ptxas -v). Double keeps the full register file per thread.
template <typename T, bool KM, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpProblemsPerBlock : 32 * kMaxWarpsPerGroup,
                                  sizeof(T) == 4 ? (WARP ? 10 : 3) : 1)
    small_solve_kernel(const SmallParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nthr = WARP ? 32 : static_cast<int>(blockDim.x);
  const int tid = WARP ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  const int grp = WARP ? static_cast<int>(threadIdx.x >> 5) : 0;
  const int64_t pb = WARP ? static_cast<int64_t>(blockIdx.x) * p.P + grp : blockIdx.x;
  if (pb >= p.B) return;  // whole warp (WARP mode); never in block mode (grid = B)

  const int N = p.N, M = p.M, S = p.S;
  unsigned char* base = smem_raw + static_cast<size_t>(grp) * p.group_bytes;
  double* red = reinterpret_cast<double*>(base);
  T* Cs = reinterpret_cast<T*>(base + kRedBytes);
  T* av = Cs + N * S;  // a
  T* la = av + N;      // log2 a
  T* lb = la + N;      // log2 b
  T* f = lb + M;
  T* fn = f + N;  // f_next
  T* g = fn + N;
  T* hv = g + M;  // per-pass vector (max(N, M))
  T* pm = hv + max(N, M);
  T* ps = pm + p.part;

  // Load the problem.
  const T* Cb = p.C + pb * N * M;
  for (int idx = tid; idx < N * M; idx += nthr) {
    const int i = idx / M;
    Cs[i * S + (idx - i * M)] = Cb[idx];
  }
  double mass_part = 0.0;
  for (int i = tid; i < N; i += nthr) {
    const T ai = p.a[pb * N + i];
    av[i] = ai;
    la[i] = log2_weight(ai);
    f[i] = p.f0[pb * N + i];
    mass_part += static_cast<double>(ai);
  }
  for (int j = tid; j < M; j += nthr) lb[j] = log2_weight(p.b[pb * M + j]);
  const double mass = group_sum<WARP>(mass_part, red, tid, nthr);
  group_sync<WARP>();

  auto eps_of = [&](int64_t t) -> T { return p.eps.at(pb, t); };
  const bool potentials = problem_uses_potentials(p.rho, pb, p.stop_potentials);

  // g = col(f0) with eps_0.
  T e = eps_of(0);
  T k = static_cast<T>(kLog2e) / e;
  T tau_a = side_damping(p.rho, pb, 0, e), tau_b = side_damping(p.rho, pb, 1, e);
  for (int i = tid; i < N; i += nthr) hv[i] = half_step_vector<T, KM>(la[i], f[i], k);
  group_sync<WARP>();
  lse_pass<T, KM, WARP>(Cs, 1, S, M, N, hv, k, e, g, pm, ps, tid, nthr, p.RTc, tau_b);
  group_sync<WARP>();

  double err = __longlong_as_double(0x7ff8000000000000LL);  // NaN
  int64_t n = 0;
  for (int64_t t = 0;; ++t) {
    e = eps_of(t);
    k = static_cast<T>(kLog2e) / e;
    tau_a = side_damping(p.rho, pb, 0, e);
    tau_b = side_damping(p.rho, pb, 1, e);
    // f_next = row(g).
    for (int j = tid; j < M; j += nthr) hv[j] = half_step_vector<T, KM>(lb[j], g[j], k);
    group_sync<WARP>();
    lse_pass<T, KM, WARP>(Cs, S, 1, N, M, hv, k, e, fn, pm, ps, tid, nthr, p.RTr, tau_a);
    group_sync<WARP>();
    const bool last = t == p.max_iter;
    if (p.has_tol || last) {
      double part = 0.0;
      for (int i = tid; i < N; i += nthr) {
        part = rules::stop_combine(potentials, part,
                                   rules::stop_term(potentials, av[i], f[i], fn[i], e));
      }
      const double total = group_sum<WARP>(part, red, tid, nthr, potentials);
      const double viol = rules::stop_value(potentials, total, mass);
      err = viol;
      // A non-finite violation stops the problem too: the torch loop raises there, and
      // the Python wrapper raises on the non-finite err this leaves.
      if (rules::should_stop(viol, p.has_tol, p.tol, t, p.eps.S, p.max_iter)) break;
    }
    // Commit: f = f_next, g = col(f).
    for (int i = tid; i < N; i += nthr) {
      const T v = fn[i];
      f[i] = v;
      hv[i] = half_step_vector<T, KM>(la[i], v, k);
    }
    ++n;
    group_sync<WARP>();
    lse_pass<T, KM, WARP>(Cs, 1, S, M, N, hv, k, e, g, pm, ps, tid, nthr, p.RTc, tau_b);
    group_sync<WARP>();
  }

  for (int i = tid; i < N; i += nthr) p.f[pb * N + i] = f[i];
  for (int j = tid; j < M; j += nthr) p.g[pb * M + j] = g[j];
  if (tid == 0) {
    p.n_iter[pb] = n;
    p.err[pb] = err;
  }
}

int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

int pow2_floor(int64_t x) {
  int p = 1;
  while (2 * static_cast<int64_t>(p) <= x) p <<= 1;
  return p;
}

struct SmallPlan {
  bool fits = false;
  bool warp = false;
  int G = 1;  // warps per problem
  int P = 1;  // problems per block
  int S = 1;
  int RTr = 32, RTc = 32, part = 0;
  int64_t group_bytes = 0;
};

// Threads along the outer index of a pass with NO outer entries, for a G-warp group.
int outer_threads(int G, int64_t NO) {
  const int r = std::min(G, pow2_ceil((NO + 31) / 32));
  return 32 * r;
}

template <typename T>
SmallPlan plan_small(int64_t N, int64_t M, const DeviceInfo& dev) {
  SmallPlan plan;
  if (N <= 0 || M <= 0 || N * M > (int64_t(1) << 24)) return plan;
  plan.S = static_cast<int>(M | 1);
  // About 32 entries of C per thread and pass, up to 16 warps per problem.
  plan.G = std::min(kMaxWarpsPerGroup, pow2_floor(std::max<int64_t>(1, N * M / 1024)));
  plan.warp = plan.G == 1;
  plan.RTr = outer_threads(plan.G, N);
  plan.RTc = outer_threads(plan.G, M);
  const int threads = 32 * plan.G;
  const int64_t CTr = threads / plan.RTr, CTc = threads / plan.RTc;
  plan.part = static_cast<int>(std::max(CTr > 1 ? CTr * N : 0, CTc > 1 ? CTc * M : 0));
  const int64_t words = N * plan.S + 4 * N + 2 * M + std::max(N, M) + 2 * plan.part;
  plan.group_bytes = (kRedBytes + words * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
  plan.fits = plan.group_bytes <= dev.smem_optin;
  if (plan.warp) {
    plan.P = static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>(kWarpProblemsPerBlock, dev.smem_optin / plan.group_bytes)));
  }
  return plan;
}

template <typename T, bool KM, bool WARP>
cudaError_t launch(const SmallParams<T>& p, int threads, int64_t blocks, size_t smem,
                   cudaStream_t stream) {
  auto kernel = small_solve_kernel<T, KM, WARP>;
  cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem));
  if (st != cudaSuccess) return st;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
Path choose_path(int64_t N, int64_t M, const DeviceInfo& dev, const char* forced, bool* ok) {
  const bool fits = plan_small<T>(N, M, dev).fits;
  *ok = true;
  if (forced != nullptr && forced[0] != '\0') {
    const std::string_view f(forced);
    if (f == "large") return Path::Large;
    if (f == "small") {
      *ok = fits;
      return Path::Small;
    }
  }
  return fits ? Path::Small : Path::Large;
}

template <typename T>
cudaError_t solve_small(const SolveArgs<T>& a, const DeviceInfo& dev, cudaStream_t stream) {
  const SmallPlan plan = plan_small<T>(a.N, a.M, dev);
  if (!plan.fits) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  SmallParams<T> p{};
  p.C = a.C;
  p.a = a.a;
  p.b = a.b;
  p.f0 = a.f0;
  p.eps = EpsTable<T>{a.eps_table, a.S};
  p.f = a.f;
  p.g = a.g;
  p.n_iter = a.n_iter;
  p.err = a.err;
  p.B = a.B;
  p.N = static_cast<int>(a.N);
  p.M = static_cast<int>(a.M);
  p.S = plan.S;
  p.P = plan.P;
  p.RTr = plan.RTr;
  p.RTc = plan.RTc;
  p.part = plan.part;
  p.group_bytes = static_cast<int>(plan.group_bytes);
  p.max_iter = a.max_iter;
  p.tol = a.tol;
  p.has_tol = a.has_tol;
  p.rho = a.rho;
  p.stop_potentials = a.stop_potentials;
  const size_t smem = static_cast<size_t>(plan.group_bytes) * plan.P;
  if (plan.warp) {
    const int64_t blocks = (a.B + plan.P - 1) / plan.P;
    return a.kernel_method ? launch<T, true, true>(p, 32 * plan.P, blocks, smem, stream)
                           : launch<T, false, true>(p, 32 * plan.P, blocks, smem, stream);
  }
  return a.kernel_method ? launch<T, true, false>(p, 32 * plan.G, a.B, smem, stream)
                         : launch<T, false, false>(p, 32 * plan.G, a.B, smem, stream);
}

#define SINKHORN_OT_INSTANTIATE(T)                                                         \
  template Path choose_path<T>(int64_t, int64_t, const DeviceInfo&, const char*, bool*); \
  template cudaError_t solve_small<T>(const SolveArgs<T>&, const DeviceInfo&, cudaStream_t);

SINKHORN_OT_INSTANTIATE(float)
SINKHORN_OT_INSTANTIATE(double)
#undef SINKHORN_OT_INSTANTIATE

}  // namespace sinkhorn_ot_cuda
