// Device helpers shared by the small (on-chip), large (streaming) and point-cloud solvers.
// The loop contract (eps table, stopping rule, violation terms) is ../loop_rules.h.
//
// Log-sum-exps are computed in base 2: with k = log2(e) / eps, a log-domain term
// (h_q - C_oq / eps) becomes x = h2_q - C_oq * k (one FMA) and exp becomes exp2 (one
// MUFU.EX2 for float). The running (max, sum) pair is "online": it is rescaled only when
// a chunk raises the max. Kernel-form terms are exp2(-C k) * v_q with v_q linear, summed
// without a max, so that exp(-C/eps) underflows exactly where the torch kernel form does.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "loop_rules.h"

namespace sinkhorn_ot_cuda {

namespace rules = ::sinkhorn_ot::rules;

constexpr double kLog2e = 1.4426950408889634073599246810019;
constexpr double kLn2 = 0.69314718055994530941723212145818;

template <typename T>
struct Math;

template <>
struct Math<float> {
  static __device__ __forceinline__ float exp2(float x) { return exp2f(x); }
  // 2^x for x <= 0 inside a log-sum-exp (terms added to a sum >= 1): one MUFU.EX2, results
  // below 2^-126 flushed to zero (exp2f adds a range test and two multiplies to keep
  // them as denormals, which cannot change such a sum).
  static __device__ __forceinline__ float exp2_lse(float x) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
  }
  static __device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
  static __device__ __forceinline__ float log2(float x) { return log2f(x); }
  static __device__ __forceinline__ float log(float x) { return logf(x); }
  static __device__ __forceinline__ float neg_inf() { return -INFINITY; }
};

template <>
struct Math<double> {
  static __device__ __forceinline__ double exp2(double x) { return ::exp2(x); }
  static __device__ __forceinline__ double exp2_lse(double x) { return ::exp2(x); }
  static __device__ __forceinline__ double max(double a, double b) { return fmax(a, b); }
  static __device__ __forceinline__ double log2(double x) { return ::log2(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
  static __device__ __forceinline__ double neg_inf() { return -static_cast<double>(INFINITY); }
};

// The eps table (B, S) on the device: iteration t of problem b uses row b, column
// min(t, S - 1) (rules::eps_at).
template <typename T>
struct EpsTable {
  const T* table;
  int64_t S;
  __device__ __forceinline__ T at(int64_t b, int64_t t) const {
    return rules::eps_at(table + b * S, S, t);
  }
};

// log2 of a weight, -inf for padding (zero weight).
template <typename T>
__device__ __forceinline__ T log2_weight(T w) {
  return w > T(0) ? Math<T>::log2(w) : Math<T>::neg_inf();
}

// The per-entry vector of a half-step from a potential p (f for the column pass, g for
// the row pass) and the log2 weight lw: log form h = lw + p k; kernel form the scaling
// exp(log w + p / eps) (torch: u = exp(log_a + f / eps)).
template <typename T, bool KM>
__device__ __forceinline__ T half_step_vector(T lw, T p, T k) {
  const T h = lw + p * k;
  return KM ? Math<T>::exp2(h) : h;
}

// Online (max, sum) of 2^x in base 2; for the kernel form only `s` is used.
template <typename T>
struct Lse {
  T m, s;
  __device__ __forceinline__ void init() {
    m = Math<T>::neg_inf();
    s = T(0);
  }
  // Fold in a chunk of U values x[] (log form; overwritten), -inf entries contribute
  // nothing. The chunk is summed pairwise (short dependency chains), U a power of two.
  template <int U>
  __device__ __forceinline__ void add_chunk(T (&x)[U]) {
    T cm = x[0];
#pragma unroll
    for (int u = 1; u < U; ++u) cm = Math<T>::max(cm, x[u]);
    if (cm > m) {
      s *= Math<T>::exp2_lse(m - cm);  // m = -inf: 0 * 0
      m = cm;
    }
    if (m != Math<T>::neg_inf()) {
#pragma unroll
      for (int u = 0; u < U; ++u) x[u] = Math<T>::exp2_lse(x[u] - m);
      s += pairwise_sum(x);
    }
  }
  // Kernel form: plain sum of the chunk's terms.
  template <int U>
  __device__ __forceinline__ void add_terms(T (&x)[U]) {
    s += pairwise_sum(x);
  }
  template <int U>
  static __device__ __forceinline__ T pairwise_sum(T (&e)[U]) {
    static_assert((U & (U - 1)) == 0, "chunk size must be a power of two");
#pragma unroll
    for (int w = 1; w < U; w *= 2) {
#pragma unroll
      for (int u = 0; u + w < U; u += 2 * w) e[u] += e[u + w];
    }
    return e[0];
  }
  // Merge another partial (log form).
  __device__ __forceinline__ void merge(T m2, T s2) {
    const T mn = m > m2 ? m : m2;
    if (mn == Math<T>::neg_inf()) return;  // both empty
    s = s * Math<T>::exp2_lse(m - mn) + s2 * Math<T>::exp2_lse(m2 - mn);
    m = mn;
  }
  // -tau eps * log(sum), the new potential, damped by tau (rules::damping: 1 for a hard
  // marginal). Log form: log(sum) = (m + log2 s) ln 2; an empty sum gives m = -inf, s = 0
  // and +inf, as torch.logsumexp does.
  template <bool KM>
  __device__ __forceinline__ T finish(T eps, T tau = T(1)) const {
    if (KM) return -eps * Math<T>::log(s) * tau;
    return -eps * static_cast<T>(kLn2) * (m + Math<T>::log2(s)) * tau;
  }
};

// Warp-wide merge of (m, s) partials; every lane ends with the total.
template <typename T, bool KM>
__device__ __forceinline__ void warp_merge(Lse<T>& acc) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T s2 = __shfl_xor_sync(0xffffffffu, acc.s, off);
    if (KM) {
      acc.s += s2;
    } else {
      const T m2 = __shfl_xor_sync(0xffffffffu, acc.m, off);
      acc.merge(m2, s2);
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Warp-wide reduction of stopping-measure terms (rules::stop_combine: a sum, or for the
// potentials rule a maximum that keeps a NaN); every lane ends with the total.
__device__ __forceinline__ double warp_stop_reduce(double v, bool potentials) {
  if (!potentials) return warp_sum(v);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v = rules::stop_combine(true, v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

// Sum over a block of kBlock threads (a multiple of 32); every thread gets the total.
// `red` is shared scratch of kBlock / 32 doubles. potentials: the maximum instead
// (rules::stop_combine), for the potentials stopping rule.
template <int kBlock>
__device__ __forceinline__ double block_sum(double v, double* red, bool potentials = false) {
  v = warp_stop_reduce(v, potentials);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kBlock / 32; ++w) total = rules::stop_combine(potentials, total, red[w]);
  return total;
}

// The damping rho / (rho + eps) of side `side` (0: rows, 1: columns) of problem b, from
// rho (B, 2) or nullptr (balanced: 1).
template <typename T>
__device__ __forceinline__ T side_damping(const T* rho, int64_t b, int side, T eps) {
  return rho == nullptr ? T(1) : rules::damping(rho[2 * b + side], eps);
}

// Whether problem b stops on its potentials (rules::uses_potentials).
template <typename T>
__device__ __forceinline__ bool problem_uses_potentials(const T* rho, int64_t b,
                                                        bool stop_potentials) {
  if (rho == nullptr) return stop_potentials;
  return rules::uses_potentials(stop_potentials, rho[2 * b], rho[2 * b + 1]);
}

// The stopping test of problem b by one block of kBlock threads, between its row pass
// (f_next in p.fn) and the update f = f_next, shared by the streaming solvers (dense and
// point clouds): the violation and the decision of rules::, err recorded, the active
// flag cleared for a problem that stops before max_iter. Returns, in every thread,
// whether the problem stops. `p` has a, f, fn, N, mass, err, active, eps, t, max_iter,
// has_tol, tol, rho, stop_potentials; `stop` is shared scratch.
template <int kBlock, typename T, typename Args>
__device__ __forceinline__ bool block_stop_test(const Args& p, int64_t b, T e, double* red,
                                                int* stop) {
  const T* a = p.a + b * p.N;
  const T* f = p.f + b * p.N;
  const T* fn = p.fn + b * p.N;
  const bool potentials = problem_uses_potentials(p.rho, b, p.stop_potentials);
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < p.N; i += kBlock) {
    part = rules::stop_combine(potentials, part,
                               rules::stop_term(potentials, a[i], f[i], fn[i], e));
  }
  const double total = block_sum<kBlock>(part, red, potentials);
  if (threadIdx.x == 0) {
    const double viol = rules::stop_value(potentials, total, p.mass[b]);
    p.err[b] = viol;
    // Non-finite: stop (the torch loop raises; the wrapper raises on this err).
    const bool stops = rules::should_stop(viol, p.has_tol, p.tol, p.t, p.eps.S, p.max_iter);
    if (stops && p.t < p.max_iter) p.active[b] = 0;
    *stop = stops;
  }
  __syncthreads();
  return *stop != 0;
}

}  // namespace sinkhorn_ot_cuda
