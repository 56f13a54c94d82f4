// Vector math for the Sinkhorn CPU kernels: the exponential of the log-sum-exp terms
// and a few lane-wise helpers, on ATen's at::vec::Vectorized<T>.
//
// Pure kernel code: raw values in, raw values out; no at::Tensor. Compiled with
// -DCPU_CAPABILITY_AVX2 -mavx2 -mfma when the CPU has AVX2, generically otherwise.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#include <immintrin.h>
#define SINKHORN_OT_AVX2 1
#endif

namespace sinkhorn_ot::cpu {

using at::vec::Vectorized;

// Terms of a max-shifted log-sum-exp are exp(y) with y <= 0. ExpTerm<T> evaluates them
// as exp2(y * log2 e): the kernels fold log2(e) into their 1/eps factor (`kScale`), so
// the exponential is a rounding, one polynomial and an exponent shift (about half the
// work of SLEEF's exp, which the generic build falls back to through exp2()).
template <typename T>
struct ExpTerm;

template <>
struct ExpTerm<float> {
  // Multiply (x - max) / eps by this before calling `apply`.
  static constexpr float kScale = 1.4426950408889634f;  // log2(e)

  // 2^y for y <= 0 (NaN-free for y = -inf). Below 2^-126 the argument is clamped, so a
  // vanishing term reads 1.2e-38 instead of 0: harmless, every sum it enters holds a
  // term equal to 1 (the maximum), and float32 cannot resolve 1e-38 against 1.
  static inline Vectorized<float> apply(const Vectorized<float>& y) {
#ifdef SINKHORN_OT_AVX2
    // n = round(y), r = y - n in [-1/2, 1/2] (exact), 2^y = 2^n * p(r) with p a
    // degree-6 near-minimax polynomial of 2^r (relative error < 8e-8, under 1 ulp).
    const __m256 shifter = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: rounds to integer
    __m256 x = _mm256_max_ps(_mm256_set1_ps(-126.0f), static_cast<__m256>(y));  // NaN stays NaN
    __m256 z = _mm256_add_ps(x, shifter);
    __m256 n = _mm256_sub_ps(z, shifter);
    __m256 r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5337576830008116e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3399860363202847e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.618519534344425e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5503289975176666e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.402264660871397e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.931472056005099e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    // The low mantissa bits of z hold n + 0x400000; (bits + 127) << 23 = bits of 2^n.
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_castps_si256(z), _mm256_set1_epi32(127)), 23);
    return Vectorized<float>(_mm256_mul_ps(p, _mm256_castsi256_ps(e)));
#else
    return y.exp2();
#endif
  }
};

template <>
struct ExpTerm<double> {
  static constexpr double kScale = 1.4426950408889634;  // log2(e)

  // 2^y for y <= 0, as for float: clamped below 2^-1022, NaN stays NaN.
  static inline Vectorized<double> apply(const Vectorized<double>& y) {
#ifdef SINKHORN_OT_AVX2
    // Degree-11 near-minimax polynomial of 2^r on [-1/2, 1/2] (relative error 2e-16).
    const __m256d shifter = _mm256_set1_pd(6755399441055744.0);  // 1.5 * 2^52
    __m256d x = _mm256_max_pd(_mm256_set1_pd(-1022.0), static_cast<__m256d>(y));
    __m256d z = _mm256_add_pd(x, shifter);
    __m256d r = _mm256_sub_pd(x, _mm256_sub_pd(z, shifter));
    __m256d p = _mm256_set1_pd(4.4346511730064367e-10);
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(7.07410015284574e-09));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0178202479361448e-07));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.3215433124923912e-06));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.5252733478574636e-05));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.5403530462434936e-04));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.3333558146802669e-03));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(9.618129107588408e-03));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(5.550410866481986e-02));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(2.4022650695910155e-01));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(6.931471805599453e-01));
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
    // The low mantissa bits of z hold n; (bits + 1023) << 52 = bits of 2^n.
    __m256i e = _mm256_slli_epi64(
        _mm256_add_epi64(_mm256_castpd_si256(z), _mm256_set1_epi64x(1023)), 52);
    return Vectorized<double>(_mm256_mul_pd(p, _mm256_castsi256_pd(e)));
#else
    return y.exp2();
#endif
  }
};

// Whether any lane of `a` is greater than the same lane of `b`.
template <typename T>
inline bool any_greater(const Vectorized<T>& a, const Vectorized<T>& b) {
#ifdef SINKHORN_OT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0;
  } else {
    return _mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_GT_OQ)) != 0;
  }
#else
  constexpr int64_t W = Vectorized<T>::size();
  T la[W], lb[W];
  a.store(la);
  b.store(lb);
  for (int64_t l = 0; l < W; ++l) {
    if (la[l] > lb[l]) return true;
  }
  return false;
#endif
}

// Lane-wise maximum without NaN propagation (one instruction; a NaN input still reaches
// the sums through its own exponential term).
template <typename T>
inline Vectorized<T> fast_max(const Vectorized<T>& a, const Vectorized<T>& b) {
#ifdef SINKHORN_OT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    return Vectorized<float>(_mm256_max_ps(a, b));
  } else {
    return Vectorized<double>(_mm256_max_pd(a, b));
  }
#else
  return at::vec::maximum(a, b);
#endif
}

// Horizontal maximum and sum of the lanes.
template <typename T>
inline T reduce_max(const Vectorized<T>& v) {
#ifdef SINKHORN_OT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  } else {
    __m128d x = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(x, _mm_unpackhi_pd(x, x)));
  }
#else
  constexpr int64_t W = Vectorized<T>::size();
  T lanes[W];
  v.store(lanes);
  T out = lanes[0];
  for (int64_t l = 1; l < W; ++l) out = lanes[l] > out ? lanes[l] : out;
  return out;
#endif
}

template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
#ifdef SINKHORN_OT_AVX2
  if constexpr (std::is_same_v<T, float>) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  } else {
    __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
#else
  constexpr int64_t W = Vectorized<T>::size();
  T lanes[W];
  v.store(lanes);
  T out = 0;
  for (int64_t l = 0; l < W; ++l) out += lanes[l];
  return out;
#endif
}

// The first `count` lanes of a vector (0 < count <= W): masked loads and stores for
// the tail of a row, without reading or writing past its end.
template <typename T>
class Lanes {
 public:
  using Vec = Vectorized<T>;
  explicit Lanes(int64_t count) : count_(count) {
#ifdef SINKHORN_OT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      alignas(32) static constexpr int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                        0,  0,  0,  0,  0,  0,  0,  0};
      mask_ = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - count));
    } else {
      alignas(32) static constexpr int64_t table[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
      mask_ = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 4 - count));
    }
#endif
  }

  // Lanes past `count` read 0.
  Vec load(const T* p) const {
#ifdef SINKHORN_OT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      return Vec(_mm256_maskload_ps(p, mask_));
    } else {
      return Vec(_mm256_maskload_pd(p, mask_));
    }
#else
    return Vec::loadu(p, count_);
#endif
  }

  // Lanes past `count` read `value`.
  Vec fill(const Vec& v, T value) const {
#ifdef SINKHORN_OT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      return Vec(_mm256_blendv_ps(_mm256_set1_ps(value), v, _mm256_castsi256_ps(mask_)));
    } else {
      return Vec(_mm256_blendv_pd(_mm256_set1_pd(value), v, _mm256_castsi256_pd(mask_)));
    }
#else
    return Vec::set(Vec(value), v, count_);
#endif
  }

  void store(const Vec& v, T* p) const {
#ifdef SINKHORN_OT_AVX2
    if constexpr (std::is_same_v<T, float>) {
      _mm256_maskstore_ps(p, mask_, v);
    } else {
      _mm256_maskstore_pd(p, mask_, v);
    }
#else
    v.store(p, static_cast<int>(count_));
#endif
  }

 private:
  int64_t count_;
#ifdef SINKHORN_OT_AVX2
  __m256i mask_;
#endif
};

// The running maxima start from the lowest finite value, never -inf, so that a shift
// (x - max) cannot read (-inf) - (-inf) = NaN on a lane that only saw padding. Inputs
// that must drop out of a sum (zero weights, masked tail lanes) are -inf.
template <typename T>
inline constexpr T kLowest = std::numeric_limits<T>::lowest();
template <typename T>
inline constexpr T kMinusInf = -std::numeric_limits<T>::infinity();

}  // namespace sinkhorn_ot::cpu
