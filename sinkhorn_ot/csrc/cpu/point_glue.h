// Torch glue shared by the CPU point-cloud ops (solve_points_cpu.cpp,
// point_softmin_cpu.cpp): the `cost` argument read as a CostKind.
#pragma once

#include <c10/util/Exception.h>

#include <string_view>

#include "point_cloud.h"

namespace sinkhorn_ot::cpu {

inline CostKind cost_kind(const char* op, std::string_view cost) {
  if (cost == "sqeuclidean") return CostKind::kSqEuclidean;
  if (cost == "euclidean") return CostKind::kEuclidean;
  TORCH_CHECK(cost == "cosine", op,
              ": `cost` must be \"sqeuclidean\", \"euclidean\" or \"cosine\", got \"", cost,
              "\"");
  return CostKind::kCosine;
}

}  // namespace sinkhorn_ot::cpu
