"""Newton steps on the semi-dual: the polish of balanced problems Sinkhorn is slow on.

At small ``eps`` Sinkhorn's linear rate approaches 1 (thousands of iterations per
decade of the error on point clouds at GeomLoss's blur 0.05), while the dual is smooth
and concave: Newton's method converges in a handful of steps once it is close
(Brauer, Clason, Lorenz and Wirth 2017, "A Sinkhorn-Newton method for entropic optimal
transport"). The solver uses it as a polish (docs/choosing.md, "Newton polish"):
Sinkhorn first, Newton on the problems that have not converged after
:data:`NEWTON_PATIENCE` iterations and whose rate says they will not soon
(:mod:`sinkhorn_ot._polish` decides), from an error of at most :data:`NEWTON_START`.

The variable is the row potential ``f`` alone, with ``g = col(f)`` (the loop's
invariant, so the column marginal stays exact). The semi-dual ``F(f) = <f, a> +
<col(f), b>`` has gradient ``a - r`` (``r = P 1``, the row marginal of the plan of
``(f, col(f))``) and Hessian ``-S / eps`` with ``S = diag(r) - P diag(1/b) P^T``
(``N x N``, null vector ``1``). At small ``eps`` ``S`` is close to singular in many
directions (rows whose columns receive mass from no other row), so exact Newton steps
are useless; the steps are Levenberg-Marquardt steps ``(S + mu diag(r)) d = eps (a -
r)``, with ``mu`` adapted per problem by the ratio of the actual to the predicted
increase of ``F`` (a trust region). The system is solved in float64, scaled by
``diag(r)^(-1/2)`` (as the implicit backward scales its own, ``autograd.py``): its
matrix is ``I - A A^T + mu I`` with ``A_ij = P_ij / sqrt(r_i b_j)``, singular values of
``A`` in [0, 1], whatever the weights.

One step costs a dense ``(B, N, M)`` plan, an ``(N, M) x (M, N)`` product and an
``N x N`` solve per problem: about ``N`` times one Sinkhorn iteration in flops, but at
GEMM speed. Hence the size limits of ``newton="auto"``.
"""

from __future__ import annotations

import torch

from ._updates import LogStep, log_plan, safe_log

#: A problem enters the polish once its error is at most this (far from the fixed
#: point the Levenberg-Marquardt steps are short and Sinkhorn iterations are cheaper).
NEWTON_START = 1e-2
#: The polish is a continuation in eps: Newton at ``eps * 2**NEWTON_STAGES``, then at each
#: halving down to ``eps``, each stage started from the line through the last two
#: stages' potentials and brought to NEWTON_START by Sinkhorn. Sinkhorn's iterations to
#: NEWTON_START about double with each halving of eps (49, 70, 103, 163, 260 from 16 eps
#: down to eps on the point-cloud case of docs/choosing.md), while a stage costs about
#: 20 iterations and 1-3 steps: four halvings are about where a fifth stops paying.
NEWTON_STAGES = 4
#: The error each stage but the last is polished to (the last one goes to ``tol``).
NEWTON_STAGE_TOL = 1e-3
#: The annealing factor of the Sinkhorn run from the cost scale into the first stage
#: (unless the caller gave one).
NEWTON_BRIDGE_SCALING = 0.7
#: ``newton="auto"``: iterations at the target eps a problem gets before the polish.
#: Problems that converge within them never see it (their results are unchanged).
NEWTON_PATIENCE = 20
#: ``newton="auto"`` only where the dense steps are cheap: at most this many rows ...
NEWTON_MAX_ROWS = 2048
#: ... and at most this many entries in ``B * N * max(N, M)`` (float64 buffers).
NEWTON_MAX_ELEMENTS = 1 << 23
#: Steps of one polish at most: from NEWTON_START it converges in 2-20 (docs/choosing.md);
#: a problem still above tol after these goes back to Sinkhorn iterations.
NEWTON_MAX_STEPS = 50
#: Levenberg-Marquardt damping: start, factor, and the value at which a problem whose
#: steps keep failing leaves the polish (to the Sinkhorn iterations after it).
_MU_START, _MU_FACTOR, _MU_GIVE_UP, _MU_FLOOR = 1e-6, 4.0, 1e4, 1e-12
#: A step is taken when ``F`` rose by this fraction of the predicted rise; the damping
#: shrinks when it rose by more than ``_GOOD_RATIO`` of it.
_ACCEPT_RATIO, _GOOD_RATIO = 1e-4, 0.5


def size_ok(shape: tuple[int, int, int]) -> bool:
    """Whether ``newton="auto"`` polishes problems of this ``(B, N, M)``."""
    batch, n, m = shape
    return n <= NEWTON_MAX_ROWS and batch * n * max(n, m) <= NEWTON_MAX_ELEMENTS


class _SemiDual:
    """The plan, row marginal, error and semi-dual value of ``(f, col(f))``, float64.

    Args:
        C: ``(B, N, M)`` float64 cost.
        a, b: ``(B, N)``, ``(B, M)`` float64 weights (zeros are padding).
        eps: ``(B, 1)`` float64.
    """

    def __init__(self, C, a, b, eps):
        self.C, self.a, self.b, self.eps = C, a, b, eps
        self.log_a, self.log_b = safe_log(a), safe_log(b)
        self.mass = a.sum(-1)
        self.half_steps = LogStep(C, self.log_a, self.log_b, eps)  # C / eps, computed once

    def evaluate(self, f: torch.Tensor):
        """``plan (B, N, M)``, ``r (B, N)``, ``err (B,)`` (relative L1 row violation: the
        column marginal is exact) and ``F (B,)``."""
        g = self.half_steps.col(f)
        plan = log_plan(self.C, self.log_a, self.log_b, f, g, self.eps)
        r = plan.sum(-1)
        err = (r - self.a).abs().sum(-1) / self.mass
        value = (f * self.a).sum(-1) + (g * self.b).sum(-1)
        return plan, r, err, value


def _step(plan, r, a, b, eps, mu):
    """The damped Newton step ``d (B, N)`` and the increase of ``F`` it predicts ``(B,)``."""
    real = a > 0
    # Rows scaled by s = sqrt(max(r, a)): the damping mu I is then at least mu a_i per
    # row, so a row whose marginal r_i has collapsed far below a_i (far from the fixed
    # point) gets a bounded step, not one of size 1 / r_i.
    scale = torch.where(real, torch.maximum(r, a), 1).sqrt()  # (B, N)
    b_root = torch.where(b > 0, b, 1).sqrt()
    scaled = plan / scale.unsqueeze(2) / b_root.unsqueeze(1)  # A (B, N, M); 0 on padding
    curvature = -torch.bmm(scaled, scaled.transpose(1, 2))  # diag(r / s^2) - A A^T
    curvature.diagonal(dim1=1, dim2=2).add_(torch.where(real, r / scale**2, 1))
    # S's null vector 1 is s here; pin it (rank one) and keep the right-hand side
    # orthogonal to it, where the system is consistent.
    pin = torch.where(real, scale, 0)
    pin = pin / pin.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(pin.dtype).tiny)
    rhs = torch.where(real, eps * (a - r) / scale, 0)
    rhs = rhs - pin * (pin * rhs).sum(-1, keepdim=True)
    system = curvature + pin.unsqueeze(2) * pin.unsqueeze(1)
    system.diagonal(dim1=1, dim2=2).add_(mu)
    # The system is symmetric positive definite: Cholesky (also because MKL's batched
    # LU fails outright once torch.set_num_threads has been called, torch 2.14). A
    # non-finite system (an overflowed plan) is never factorised, and one that is not
    # numerically positive definite gets no step: either way the step is 0, which the
    # caller rejects (and damps the next one more).
    finite = torch.isfinite(system).all(dim=(1, 2)) & torch.isfinite(rhs).all(dim=-1)
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    factor, info = torch.linalg.cholesky_ex(torch.where(finite.view(-1, 1, 1), system, eye))
    solved = finite & (info == 0)
    factor = torch.where(solved.view(-1, 1, 1), factor, eye)
    rhs = torch.where(solved.unsqueeze(-1), rhs, 0)
    nu = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    quadratic = (nu * torch.bmm(curvature, nu.unsqueeze(-1)).squeeze(-1)).sum(-1)
    predicted = ((rhs * nu).sum(-1) - 0.5 * quadratic) / eps.squeeze(-1)
    return torch.where(real, nu / scale, 0), predicted


def polish(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: torch.Tensor,
    f: torch.Tensor,
    tol: float,
    budget: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt steps on ``f`` until each problem meets ``tol`` or stalls.

    Args:
        C: ``(B, N, M)`` cost (any float dtype; the steps run in float64).
        a, b: ``(B, N)``, ``(B, M)`` weights with equal masses; zeros mark padding.
        eps: ``(B,)``.
        f: ``(B, N)`` row potential to start from (``g = col(f)`` is implied).
        tol: target of the relative L1 violation of ``(f, col(f))``'s plan.
        budget: ``(B,)`` int64, steps each problem may take (each counts as an iteration;
            never more than :data:`NEWTON_MAX_STEPS`).

    Returns:
        ``f (B, N)`` in the dtype of ``f``, ``steps (B,)`` int64 (steps taken, rejected
        ones included) and ``err (B,)`` float64, the violation of the returned ``f``.
        Padding rows keep their ``f``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._newton import polish
        >>> gen = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(1, 40, 2, generator=gen), torch.randn(1, 50, 2, generator=gen)
        >>> C = torch.cdist(x, y).double() ** 2 / 2
        >>> a, b = torch.full((1, 40), 1 / 40).double(), torch.full((1, 50), 1 / 50).double()
        >>> f, steps, err = polish(C, a, b, torch.tensor([0.01]).double(),
        ...                        torch.zeros(1, 40).double(), 1e-7, torch.tensor([100]))
        >>> bool(err[0] <= 1e-7), int(steps[0]) < 100  # from f = 0, far from the fixed point
        (True, True)
    """
    dtype = f.dtype
    eps64 = eps.detach().double().unsqueeze(-1)
    a64, b64 = a.detach().double(), b.detach().double()
    semi = _SemiDual(C.detach().double(), a64, b64, eps64)
    f = f.detach().double()
    plan, r, err, value = semi.evaluate(f)
    mu = torch.full_like(err, _MU_START)
    steps = torch.zeros_like(budget)
    active = (err > tol) & (budget > 0) & torch.isfinite(err)
    while bool(active.any()):
        d, predicted = _step(plan, r, a64, b64, eps64, mu.view(-1, 1))
        trial = torch.where(active.unsqueeze(-1), f + d, f)
        plan_t, r_t, err_t, value_t = semi.evaluate(trial)
        rise = value_t - value
        # Near the fixed point the predicted rise is below F's rounding: judge by the error.
        below_rounding = predicted.abs() <= 64 * torch.finfo(torch.float64).eps * value.abs()
        accepted = active & torch.isfinite(err_t) & torch.isfinite(value_t)
        accepted &= torch.where(
            below_rounding, err_t < err, rise > _ACCEPT_RATIO * predicted.clamp_min(0)
        )
        good = accepted & (below_rounding | (rise > _GOOD_RATIO * predicted))
        f = torch.where(accepted.unsqueeze(-1), trial, f)
        plan = torch.where(accepted.view(-1, 1, 1), plan_t, plan)
        r = torch.where(accepted.unsqueeze(-1), r_t, r)
        err = torch.where(accepted, err_t, err)
        value = torch.where(accepted, value_t, value)
        damped = torch.where(good, (mu / _MU_FACTOR).clamp_min(_MU_FLOOR), mu * _MU_FACTOR)
        mu = torch.where(active, damped, mu)
        steps = steps + active
        active = active & (err > tol) & (steps < budget) & (mu <= _MU_GIVE_UP)
        active &= steps < NEWTON_MAX_STEPS
    return f.to(dtype), steps, err
