// Torch glue shared by the CPU implementations of both ops (solve_cpu.cpp,
// solve_points_cpu.cpp): the checks of the arguments they have in common, the loop
// settings, the outputs and the Problem of batch entry k.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

#include "problem.h"

namespace sinkhorn_ot::cpu {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// `t` has shape `shape` and the dtype and device of `ref` (named `ref_name`).
inline void check_input(const char* op, const at::Tensor& t, const char* name,
                   at::IntArrayRef shape, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == shape, op, ": `", name, "` must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` must have the dtype of `",
              ref_name, "` (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` must be on the device of `",
              ref_name, "` (", ref.device(), "), got ", t.device());
}

// The dtype and device of the leading tensor `ref` of an op.
inline void check_leading(const char* op, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op, ": `",
              name, "` must be float32 or float64, got ", ref.scalar_type());
  TORCH_CHECK(ref.device().is_cpu(), op, " (CPU kernel): `", name, "` must be on the CPU, got ",
              ref.device());
}

// Checks a (B, N), b (B, M), f0 (B, N), eps_table (B, S) against `ref` and the scalar
// arguments; returns the loop settings.
inline LoopSettings check_common(const char* op, const at::Tensor& ref, const char* ref_name,
                            int64_t batch, int64_t n, int64_t m, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& f0,
                            const at::Tensor& eps_table, int64_t max_iter,
                            std::optional<double> tol, std::string_view method,
                            const std::optional<at::Tensor>& rho = std::nullopt,
                            std::string_view stop = "marginals", double momentum = 1.0,
                            bool momentum_auto = false) {
  check_input(op, a, "a", {batch, n}, ref, ref_name);
  check_input(op, b, "b", {batch, m}, ref, ref_name);
  check_input(op, f0, "f0", {batch, n}, ref, ref_name);
  TORCH_CHECK(eps_table.dim() == 2 && eps_table.size(0) == batch && eps_table.size(1) >= 1, op,
              ": `eps_table` must have shape (B, S) = (", batch, ", S) with S >= 1, got ",
              eps_table.sizes());
  check_input(op, eps_table, "eps_table", eps_table.sizes(), ref, ref_name);
  TORCH_CHECK(method == "log" || method == "kernel" || method == "stabilised", op,
              ": `method` must be \"log\", \"kernel\" or \"stabilised\", got \"", method,
              "\"");
  TORCH_CHECK(max_iter >= 0, op, ": `max_iter` must be >= 0, got ", max_iter);
  TORCH_CHECK(!tol.has_value() || !std::isnan(*tol), op, ": `tol` must not be NaN");
  if (rho.has_value()) check_input(op, *rho, "rho", {batch, 2}, ref, ref_name);
  TORCH_CHECK(stop == "marginals" || stop == "potentials", op,
              ": `stop` must be \"marginals\" or \"potentials\", got \"", stop, "\"");
  TORCH_CHECK(momentum > 0.0 && momentum < 2.0, op,
              ": `momentum` must lie in (0, 2), got ", momentum);
  const bool blended = momentum_auto || momentum != 1.0;
  TORCH_CHECK(!blended || (!rho.has_value() && stop == "marginals"), op,
              ": `momentum` needs balanced problems on the marginals rule (rho = None, "
              "stop = \"marginals\")");
  TORCH_CHECK(!blended || method != "stabilised", op,
              ": `momentum` runs with method \"log\" or \"kernel\", got \"stabilised\"");
  LoopSettings settings;
  settings.momentum = momentum;
  settings.momentum_auto = momentum_auto;
  settings.stop_potentials = stop == "potentials";
  settings.max_iter = max_iter;
  settings.has_tol = tol.has_value();
  settings.tol = tol.value_or(0.0);
  settings.method = method == "kernel"       ? Method::kKernel
                    : method == "stabilised" ? Method::kStabilised
                                             : Method::kLog;
  return settings;
}

inline Outputs empty_outputs(const at::Tensor& ref, int64_t batch, int64_t n, int64_t m) {
  return {at::empty({batch, n}, ref.options()), at::empty({batch, m}, ref.options()),
          at::empty({batch}, ref.options().dtype(at::kLong)),
          at::empty({batch}, ref.options().dtype(at::kDouble))};
}

// The Problem of batch entry k; C = nullptr for point clouds. All tensors contiguous;
// rho (B, 2) = (rho_a, rho_b) per problem, or undefined (balanced).
template <typename T>
inline Problem<T> problem_at(int64_t k, const T* C, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& f0, const at::Tensor& eps_table, at::Tensor& f,
                        at::Tensor& g, const at::Tensor& rho = at::Tensor()) {
  const int64_t n = a.size(1), m = b.size(1), S = eps_table.size(1);
  Problem<T> p{C == nullptr ? nullptr : C + k * n * m,
               a.const_data_ptr<T>() + k * n,
               b.const_data_ptr<T>() + k * m,
               f0.const_data_ptr<T>() + k * n,
               n,
               m,
               eps_table.const_data_ptr<T>() + k * S,
               S,
               f.mutable_data_ptr<T>() + k * n,
               g.mutable_data_ptr<T>() + k * m};
  if (rho.defined()) {
    p.rho_a = rho.const_data_ptr<T>()[2 * k];
    p.rho_b = rho.const_data_ptr<T>()[2 * k + 1];
  }
  return p;
}

}  // namespace sinkhorn_ot::cpu
