// Torch glue shared by the CPU point-cloud ops (solve_points_cpu.cpp,
// point_softmin_cpu.cpp): the two clouds' checks and the `cost` argument as a CostKind.
#pragma once

#include <c10/util/Exception.h>

#include <optional>
#include <string_view>
#include <vector>

#include "glue.h"
#include "point_cloud.h"

namespace sinkhorn_ot::cpu {

// x (B, N, D) float32/float64 on the CPU, y (B, M, D) with its dtype and device.
inline void check_clouds(const char* op, const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 3, op, ": `x` must have shape (B, N, D), got ", x.sizes());
  check_leading(op, x, "x");
  const int64_t batch = x.size(0), d = x.size(2);
  TORCH_CHECK(y.dim() == 3 && y.size(0) == batch && y.size(2) == d, op,
              ": `y` must have shape (B, M, D) = (", batch, ", M, ", d, "), got ", y.sizes());
  check_input(op, y, "y", y.sizes(), x, "x");
}

// The optional row_lengths (B,) int64 of point_softmin, on the CPU, each in [0, N], as a
// vector (empty: every row is computed).
inline std::vector<int64_t> checked_row_lengths(const char* op,
                                                const std::optional<at::Tensor>& lengths,
                                                const at::Tensor& x) {
  if (!lengths.has_value()) return {};
  const at::Tensor& t = *lengths;
  const int64_t batch = x.size(0), n = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, op,
              ": `row_lengths` must have shape (B,) = (", batch, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.device() == x.device(), op,
              ": `row_lengths` must be int64 on the device of `x`, got ", t.scalar_type(),
              " on ", t.device());
  const at::Tensor c = t.contiguous();
  std::vector<int64_t> out(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + batch);
  for (int64_t k = 0; k < batch; ++k) {
    TORCH_CHECK(out[k] >= 0 && out[k] <= n, op, ": `row_lengths` must lie in [0, N = ", n,
                "], got ", out[k], " for problem ", k);
  }
  return out;
}

inline CostKind cost_kind(const char* op, std::string_view cost) {
  if (cost == "sqeuclidean") return CostKind::kSqEuclidean;
  if (cost == "euclidean") return CostKind::kEuclidean;
  TORCH_CHECK(cost == "cosine", op,
              ": `cost` must be \"sqeuclidean\", \"euclidean\" or \"cosine\", got \"", cost,
              "\"");
  return CostKind::kCosine;
}

}  // namespace sinkhorn_ot::cpu
