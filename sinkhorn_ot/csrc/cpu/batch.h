// How a batch of problems is spread over threads, shared by the torch glue of both ops
// (solve_cpu.cpp, solve_points_cpu.cpp).
//
// Whole problems per thread when there are enough of them (one fork/join per solve,
// no synchronisation per half-step); otherwise one problem after the other, each
// half-step split over rows / column blocks. Every entry is computed the same way
// whatever the split, so results do not depend on the number of threads.
//
// No at::Tensor: raw outputs and a per-problem solve callback.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include "problem.h"

namespace sinkhorn_ot::cpu {

// Splits a half-step over threads (inline when already inside a parallel region).
struct AtenFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& f) const {
    at::parallel_for(begin, end, grain, f);
  }
};

// Whether to give whole problems to threads; `work` is the cost of one half-step.
inline bool parallel_over_batch(int64_t batch, int64_t work, int64_t threads) {
  if (threads <= 1 || batch <= 1) return false;
  return batch >= 4 * threads || (batch % threads == 0 && work <= (1 << 20)) ||
         work <= (1 << 14);
}

// Runs solve(k, ws, policy) -> Outcome for every problem k < batch and records n_iter
// and err. Workspace<T> is per thread.
template <typename T, typename Solve>
void run_batch(int64_t batch, int64_t work, int64_t* iters, double* errs, const Solve& solve) {
  auto record = [&](int64_t k, const Outcome& o) {
    iters[k] = o.n_iter;
    errs[k] = o.err;
  };
  const int64_t threads = at::get_num_threads();
  if (parallel_over_batch(batch, work, threads)) {
    std::atomic<int64_t> next{0};  // dynamic schedule: problems stop at different times
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      Workspace<T> ws;
      for (int64_t k = next++; k < batch; k = next++) record(k, solve(k, ws, SerialFor{}));
    });
  } else {
    Workspace<T> ws;
    for (int64_t k = 0; k < batch; ++k) record(k, solve(k, ws, AtenFor{}));
  }
}

}  // namespace sinkhorn_ot::cpu
