// Schema of the native Sinkhorn op, declared once; the CPU (csrc/cpu) and CUDA
// (csrc/cuda) libraries only add implementations. Semantics: sinkhorn_ot/_loop.py
// (solve_potentials) and docs/native.md.
//
//   method: 0 = log, 1 = kernel.  tol < 0: no tolerance (exactly max_iter iterations).
//   Annealing: iteration t < anneal_steps uses max(eps, eps0 * eps_scaling**t).
//   Returns f (B, N), g (B, M) in the dtype of C (not normalised), n_iter (B,) int64,
//   err (B,) float64.
#include <torch/library.h>

TORCH_LIBRARY(sinkhorn_ot, m) {
  m.def(
      "solve(Tensor C, Tensor a, Tensor b, Tensor eps, Tensor f0, Tensor eps0, int anneal_steps, "
      "float eps_scaling, int max_iter, float tol, int method) -> (Tensor, Tensor, Tensor, Tensor)");
}
