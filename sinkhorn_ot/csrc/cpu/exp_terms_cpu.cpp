// sinkhorn_ot::exp_terms(x): exp(x) for x <= 0 by the vector exponential of the CPU
// kernels (ExpTerm in vec_math.h), so that benchmarks can measure the exponential
// throughput the log-domain kernels are bound by (their "exp floor") and tests can
// check its accuracy against torch.exp. Declared here as a fragment of the library so
// the solve schemas in ../sinkhorn.cpp stay as they are.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

namespace sinkhorn_ot::cpu {
namespace {

at::Tensor exp_terms_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "sinkhorn_ot::exp_terms: `x` must be float32 or float64, got ", x.scalar_type());
  const auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "sinkhorn_ot_exp_terms", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    constexpr int64_t W = Vec::size();
    const T* in = xc.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    const Vec scale(ExpTerm<T>::kScale);
    at::parallel_for(0, xc.numel(), 1 << 16, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      for (; i + W <= i1; i += W) ExpTerm<T>::apply(Vec::loadu(in + i) * scale).store(o + i);
      if (i < i1) {
        const Lanes<T> tail(i1 - i);
        tail.store(ExpTerm<T>::apply(tail.load(in + i) * scale), o + i);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkhorn_ot, m) { m.def("exp_terms(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(sinkhorn_ot, CPU, m) { m.impl("exp_terms", &exp_terms_cpu); }

}  // namespace sinkhorn_ot::cpu
