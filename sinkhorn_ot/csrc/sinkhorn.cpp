// Schemas of the native Sinkhorn ops, declared once; the CPU (csrc/cpu) and CUDA
// (csrc/cuda) libraries only add implementations. The Python wrappers, fake (meta)
// implementations and input checks are in sinkhorn_ot/ops.py; the loop contract they
// share (eps table, stopping rule, violation) is csrc/loop_rules.h; semantics:
// sinkhorn_ot/_loop.py (solve_potentials) and docs/native.md.
//
//   solve:        a dense cost C (B, N, M).
//   solve_points: point clouds x (B, N, D), y (B, M, D); the cost
//                 cost_scale * c(x_i, y_j) with c one of "sqeuclidean" (|x - y|^2),
//                 "euclidean" (|x - y|) or "cosine" (1 - cos(x, y)) is computed on the
//                 fly: nothing of size N * M is stored.
//
//   a (B, N), b (B, M): weights, zeros = padding; f0 (B, N): initial row potential;
//   eps_table (B, S): iteration t uses eps_table[:, min(t, S - 1)];
//   tol = None: exactly max_iter iterations; method: "log" or "kernel";
//   rho (B, 2): (rho_a, rho_b), the relaxation of each marginal (inf = hard; None: all
//   balanced), damping the half-steps by rho / (rho + eps); stop: "marginals" or
//   "potentials", the rule of balanced problems (relaxed ones always use the second);
//   momentum (omega in (0, 2)) / momentum_auto: over-relaxation from the target eps on
//   (csrc/loop_rules.h), CPU only: the CUDA kernels reject it.
//   Returns f (B, N), g (B, M) in the dtype of the inputs (not normalised),
//   n_iter (B,) int64, err (B,) float64.
#include <torch/library.h>

TORCH_LIBRARY(sinkhorn_ot, m) {
  m.def(
      "solve(Tensor C, Tensor a, Tensor b, Tensor f0, Tensor eps_table, int max_iter, "
      "float? tol, str method, Tensor? rho=None, str stop=\"marginals\", float momentum=1.0, "
      "bool momentum_auto=False) "
      "-> (Tensor f, Tensor g, Tensor n_iter, Tensor err)");
  m.def(
      "solve_points(Tensor x, Tensor y, Tensor a, Tensor b, Tensor f0, Tensor eps_table, "
      "int max_iter, float? tol, str method, str cost, float cost_scale, Tensor? rho=None, "
      "str stop=\"marginals\", float momentum=1.0, bool momentum_auto=False) "
      "-> (Tensor f, Tensor g, Tensor n_iter, Tensor err)");
}
