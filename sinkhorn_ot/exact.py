"""Exact (unregularised) optimal transport by linear programming with SciPy's HiGHS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _arrays
from . import _validation as v


@dataclass(frozen=True)
class EMDResult:
    """Exact OT solution, batched like the input.

    Attributes:
        plan: optimal plan ``(B, N, M)``.
        value: optimal cost ``<C, plan>`` ``(B,)``.
        f: row dual potentials ``(B, N)``; ``f_i + g_j <= C_ij`` for every entry (padded
            rows and columns included) with equality on the plan's support; normalised so
            that ``<f, a> = <g, b>``.
        g: column dual potentials ``(B, M)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import emd
        >>> res = emd(torch.rand(2, 3, 4, dtype=torch.float64))
        >>> res.plan.shape, res.value.shape, res.f.shape, res.g.shape
        (torch.Size([2, 3, 4]), torch.Size([2]), torch.Size([2, 3]), torch.Size([2, 4]))
    """

    plan: torch.Tensor
    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor


def emd(C: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> EMDResult:
    """Exact optimal transport (earth mover's distance) by linear programming.

    Solves ``min <C, P>`` s.t. ``P 1 = a``, ``P^T 1 = b``, ``P >= 0`` with
    ``scipy.optimize.linprog(method="highs")``, one problem at a time on the CPU, in
    float64. Meant for small problems (a few hundred points) and as a test oracle.
    Zero weights are padding: their rows/columns of the plan are zero and their
    potentials are finite c-transforms (a padded row's ``f_i`` of the real ``g``, a
    padded column's ``g_j`` of all of ``f``), so ``f_i + g_j <= C_ij`` for every entry.

    Args:
        C: cost ``(N, M)`` or ``(B, N, M)``: a tensor, a NumPy array or anything
            :func:`torch.as_tensor` reads (as are ``a`` and ``b``).
        a: row weights ``(N,)``/``(B, N)``, default uniform.
        b: column weights ``(M,)``/``(B, M)``, default uniform; same mass as ``a``.

    Returns:
        :class:`EMDResult` in ``C``'s dtype and device (unbatched for unbatched input);
        its fields are NumPy arrays when no argument is a tensor (NumPy arrays or lists
        in, like ``ot.emd``).

    Example:
        >>> import torch
        >>> from sinkhorn_ot import emd
        >>> C = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> res = emd(C)
        >>> (res.plan + 0.0).tolist(), float(res.value)
        ([[0.5, 0.0], [0.0, 0.5]], 0.0)
    """
    arrays = _arrays.Arrays(C, a, b)  # NumPy in, NumPy out
    C, a, b = map(arrays.tensor, (C, a, b))
    problem = v.check_problem(C, a, b, 1.0)
    Cs = problem.C.detach().cpu().double().numpy()
    As = problem.a.detach().cpu().double().numpy()
    Bs = problem.b.detach().cpu().double().numpy()
    outs = [_solve_one(Cs[k], As[k], Bs[k]) for k in range(Cs.shape[0])]
    kw = {"dtype": problem.C.dtype, "device": problem.C.device}
    plan, f, g = (torch.as_tensor(np.stack([o[i] for o in outs]), **kw) for i in range(3))
    value = (plan * problem.C).sum(dim=(1, 2))
    if not problem.batched:
        return arrays.back(EMDResult(plan[0], value[0], f[0], g[0]))
    return arrays.back(EMDResult(plan, value, f, g))


def _solve_one(C: np.ndarray, a: np.ndarray, b: np.ndarray):
    import scipy.optimize  # imported on first use: it takes half a second
    import scipy.sparse

    rows, cols = np.flatnonzero(a > 0), np.flatnonzero(b > 0)
    n, m = len(rows), len(cols)
    cost = C[np.ix_(rows, cols)]
    # Equality constraints: n row sums then m column sums over the row-major plan.
    eye_n, eye_m = scipy.sparse.identity(n), scipy.sparse.identity(m)
    A_eq = scipy.sparse.vstack(
        [scipy.sparse.kron(eye_n, np.ones((1, m))), scipy.sparse.kron(np.ones((1, n)), eye_m)]
    ).tocsr()
    b_eq = np.concatenate([a[rows], b[cols]])
    res = scipy.optimize.linprog(
        cost.ravel(), A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs"
    )
    if res.status != 0:
        raise RuntimeError(f"emd: linprog (HiGHS) failed: {res.message}")
    plan = np.zeros_like(C)
    plan[np.ix_(rows, cols)] = res.x.reshape(n, m)
    duals = res.eqlin.marginals
    f_sup, g_sup = duals[:n], duals[n:]
    # Split the free constant so that <f, a> = <g, b>.
    shift = (g_sup @ b[cols] - f_sup @ a[rows]) / (2 * a.sum())
    f_sup, g_sup = f_sup + shift, g_sup - shift
    # Padding (zero weight, so the value does not change): a padded row's f is the
    # c-transform of the real g; then a padded column's g is the c-transform of the whole
    # f, padded rows included. Every f_i + g_j <= C_ij holds, padded x padded too (two
    # c-transforms of the real duals alone need not satisfy it there), and all stay finite.
    f = (C[:, cols] - g_sup[None, :]).min(axis=1)
    f[rows] = f_sup
    g = (C - f[:, None]).min(axis=0)
    g[cols] = g_sup
    return plan, f, g
