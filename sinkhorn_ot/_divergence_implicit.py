"""``sinkhorn_divergence(..., grad="implicit")``: the value from three converged solves.

The converged mode of :func:`sinkhorn_ot.sinkhorn_divergence` ends at the fixed points of
OT(α, β), OT(α, α) and OT(β, β). With ``grad="implicit"`` each of these is then passed
to :func:`sinkhorn_ot.sinkhorn` (warm-started from the symmetric loop's potentials, so it
stops after an iteration or two) with ``grad="implicit"``, and the divergence is
assembled from their ``value`` fields. Its gradients are then those of the exact
fixed points (the solver's implicit adjoint), and its value is GeomLoss's
``sinkhorn_cost`` at convergence:

* balanced: ``S = V_ab - V_aa / 2 - V_bb / 2``; without debiasing ``V_ab``;
* unbalanced (``rho``): the solver's ``value`` is the primal cost with the generalised
  ``KL(P || a b^T)``, whose mass terms are ``eps m(a) m(b)``, where GeomLoss's dual
  formula has ``eps (m(a) + m(b)) / 2``. So ``S = V_ab - V_aa / 2 - V_bb / 2 +
  eps (m(a) - m(b))^2 / 2`` and, without debiasing, ``V_ab + eps ((m(a) + m(b)) / 2 -
  m(a) m(b))``.
"""

from __future__ import annotations

import torch

from .solver import sinkhorn


def _solve(geometry, a, b, init, *, eps, rho, tol, max_iter, backend):
    result = sinkhorn(
        geometry,
        a,
        b,
        eps=eps,
        rho_a=rho,
        rho_b=rho,
        tol=tol,
        max_iter=max_iter,
        init=init,
        grad="implicit",
        backend=backend,
    )
    return result.value


def implicit_value(
    geometries,
    state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    eps: float,
    rho: float | None,
    debias: bool,
    tol: float,
    max_iter: int,
    backend: str,
) -> torch.Tensor:
    """The ``(B,)`` divergence values of converged potentials, implicitly differentiable.

    Args:
        geometries: ``(xy, xx, yy)``: what :func:`sinkhorn_ot.sinkhorn` accepts for the
            three problems, differentiable (``xx``, ``yy`` are ``None`` without
            debiasing).
        state: ``(P B, K)`` potentials of :class:`SymmetricLoop` after ``converge``
            (parts ``f_ba, g_ab, f_aa, g_bb``), the warm starts.
        a, b: ``(B, N)``, ``(B, M)`` weights, differentiable.
        eps, rho: target temperature and marginal penalty (``None``: balanced).
        debias, tol, max_iter, backend: as in :func:`sinkhorn_ot.sinkhorn_divergence`.

    Returns:
        ``(B,)`` values in the compute dtype.
    """
    batch, n, m = a.shape[0], a.shape[1], b.shape[1]
    warm = state.detach()

    def part(index: int, size: int) -> torch.Tensor:
        return warm[index * batch : (index + 1) * batch, :size]

    settings = {"eps": eps, "rho": rho, "tol": tol, "max_iter": max_iter, "backend": backend}
    xy, xx, yy = geometries
    value = _solve(xy, a, b, (part(0, n), part(1, m)), **settings)
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    if debias:
        f_aa, g_bb = part(2, n), part(3, m)
        value = value - 0.5 * _solve(xx, a, a, (f_aa, f_aa), **settings)
        value = value - 0.5 * _solve(yy, b, b, (g_bb, g_bb), **settings)
        if rho is not None:
            value = value + 0.5 * eps * (mass_a - mass_b) ** 2
    elif rho is not None:
        value = value + eps * (0.5 * (mass_a + mass_b) - mass_a * mass_b)
    return value
