// Torch glue shared by the CPU point-cloud ops (solve_points_cpu.cpp,
// point_softmin_cpu.cpp): the two clouds' checks and the `cost` argument as a CostKind.
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

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

inline CostKind cost_kind(const char* op, std::string_view cost) {
  if (cost == "sqeuclidean") return CostKind::kSqEuclidean;
  if (cost == "euclidean") return CostKind::kEuclidean;
  TORCH_CHECK(cost == "cosine", op,
              ": `cost` must be \"sqeuclidean\", \"euclidean\" or \"cosine\", got \"", cost,
              "\"");
  return CostKind::kCosine;
}

}  // namespace sinkhorn_ot::cpu
