"""The Sinkhorn loop of the torch backend: potentials in, potentials out.

This is the reference every other backend must reproduce (same iterates, same
stopping decisions, same iteration counts). The native backends implement
:func:`solve_potentials` with the same signature and semantics.

Iteration scheme (docs/conventions.md, "Iterations"): ``g = col(f0)``; then each iteration is ``f = row(g)``
followed by ``g = col(f)``. Before each row update the marginal violation of the
current ``(f, g)`` is known for free (see :func:`_updates.row_violation`); a problem
whose violation is ``<= tol`` stops there, so its returned ``g`` is always ``col(f)``
and its plan meets the column marginal exactly (Algorithm 1, line 8).
"""

from __future__ import annotations

import torch

from ._unbalanced import damping, potential_change
from ._updates import column_violation, row_violation, safe_log
from .errors import KernelUnderflowError  # noqa: F401  (re-exported: its old home)
from .errors import raise_non_finite as _raise_non_finite


def eps_schedule(
    eps: torch.Tensor, C: torch.Tensor, eps_scaling: float | None
) -> tuple[torch.Tensor, int]:
    """Starting eps ``(B,)`` of the annealing, and how many iterations it lasts.

    With ``eps_scaling = s``, iteration ``t`` uses ``max(eps, eps0 * s**t)`` where
    ``eps0`` is the cost scale ``max |C_ij|`` of each problem (never below ``eps``).
    """
    if eps_scaling is None:
        return eps, 0
    scale = C.detach().abs().amax(dim=(1, 2)).to(eps.dtype)
    eps0 = torch.maximum(scale, eps.detach())
    ratio = (eps0 / eps.detach()).double().log().max().item()
    steps = int(torch.tensor(ratio / -torch.tensor(eps_scaling).log().item()).ceil().item())
    return eps0, steps


def eps_table(
    eps: torch.Tensor, scale: torch.Tensor, eps_scaling: float | None, stage_iters: int = 1
) -> torch.Tensor:
    """The eps of every iteration, ``(B, S)``: iteration ``t`` uses column ``min(t, S - 1)``.

    The one schedule every backend runs (the native ops take this table, see
    ``csrc/loop_rules.h``). Without annealing ``S = 1`` and the table is ``eps``. With
    ``eps_scaling = s``, column ``t < S - 1`` is ``max(eps, eps0 * s**t)`` with ``eps0 =
    max(scale, eps)`` (the cost scale ``max |C_ij|`` of each problem), and the last column
    is ``eps``; problems may stop only once they reach it. ``stage_iters = k > 1`` makes
    the schedule stage-wise: each eps of the geometric sequence is used for ``k``
    iterations (columns repeated), as GeomLoss and OTT-JAX anneal; the native loops read
    the same table, so they need no change.

    Args:
        eps: ``(B,)`` target regularisation.
        scale: ``(B,)`` cost scale, ``max |C_ij|`` per problem (only read when annealing).
        eps_scaling: ``None`` or a factor in (0, 1).
        stage_iters: iterations per annealing stage (``>= 1``; read only when annealing).

    Returns:
        ``(B, S)`` in the dtype of ``eps``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._loop import eps_table
        >>> eps_table(torch.tensor([0.25]), torch.tensor([1.0]), 0.5).tolist()
        [[1.0, 0.5, 0.25]]
        >>> eps_table(torch.tensor([0.25]), torch.tensor([1.0]), 0.5, stage_iters=2).tolist()
        [[1.0, 1.0, 0.5, 0.5, 0.25]]
    """
    if eps_scaling is None:
        return eps.unsqueeze(-1)
    # eps keeps its autograd graph (grad="unroll" differentiates through the schedule).
    eps0 = torch.maximum(scale.detach().to(eps.dtype), eps.detach())
    ratio = (eps0 / eps.detach()).double().log().max().item()
    steps = int(torch.tensor(ratio / -torch.tensor(eps_scaling).log().item()).ceil().item())
    columns = [torch.maximum(eps, eps0 * eps_scaling**t) for t in range(steps)]
    columns = [column for column in columns for _ in range(stage_iters)]
    return torch.stack([*columns, eps], dim=-1)


def solve_potentials(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: torch.Tensor,
    f0: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    method: str,
    eps_scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Sinkhorn iterations from ``f0`` on a dense cost (the oracle of the tests).

    :func:`solve` on ``DenseCost(C)`` with the schedule of :func:`eps_table`.

    Args:
        C: cost ``(B, N, M)``.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses; zeros mark padding.
        eps: ``(B,)`` target regularisation.
        f0: ``(B, N)`` initial row potential.
        max_iter: number of (row, column) update pairs at most.
        tol: stop a problem once its relative L1 marginal violation is ``<= tol``;
            ``None`` runs exactly ``max_iter`` iterations.
        method: ``"log"`` or ``"kernel"``.
        eps_scaling: optional annealing factor in (0, 1), see :func:`eps_table`.

    Returns:
        ``f (B, N)``, ``g (B, M)``, ``n_iter (B,)`` int64, ``err (B,)`` float64, as
        :func:`solve`.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._loop import solve_potentials
        >>> C = torch.rand(2, 3, 4, dtype=torch.float64)
        >>> a, b = torch.full((2, 3), 1 / 3, dtype=torch.float64), torch.full((2, 4), 0.25, dtype=torch.float64)
        >>> f, g, n_iter, err = solve_potentials(
        ...     C, a, b, torch.full((2,), 0.1, dtype=torch.float64), torch.zeros_like(a),
        ...     max_iter=500, tol=1e-9, method="log")
        >>> bool((err <= 1e-9).all())
        True
    """
    from .geometry import DenseCost

    geometry = DenseCost(C)
    table = eps_table(eps, geometry.scale() if eps_scaling is not None else eps, eps_scaling)
    return solve(geometry, a, b, f0, table, max_iter=max_iter, tol=tol, method=method)


#: Momentum (``csrc/loop_rules.h``): a problem engages it once its error at the target
#: eps is at most MOMENTUM_THRESHOLD (over-relaxation converges near the fixed point,
#: not from anywhere); ``"auto"`` then runs MOMENTUM_WINDOW plain iterations, and takes
#: omega from their contraction rate, capped at MOMENTUM_MAX_RATE.
MOMENTUM_THRESHOLD, MOMENTUM_WINDOW, MOMENTUM_MAX_RATE = 0.1, 10, 0.999


def momentum_from_rate(err_now: torch.Tensor, err_before: torch.Tensor) -> torch.Tensor:
    """``omega = 2 / (1 + sqrt(1 - theta))`` per problem, ``theta = (err_now /
    err_before) ** (1 / MOMENTUM_WINDOW)`` the contraction rate of plain Sinkhorn,
    clamped to ``[0, MOMENTUM_MAX_RATE]``; 1 where an error is 0 or not finite.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._loop import momentum_from_rate
        >>> omega = momentum_from_rate(torch.tensor([1e-3, 0.0]), torch.tensor([1e-2, 1.0]))
        >>> [round(w, 4) for w in omega.tolist()]  # a tenfold drop over the window; no error
        [1.376, 1.0]
        >>> round(2 / (1 + (1 - 0.1 ** (1 / 10)) ** 0.5), 4)
        1.376
    """
    known = (err_now > 0) & (err_before > 0) & torch.isfinite(err_now / err_before)
    ratio = torch.where(known, err_now / torch.where(known, err_before, 1), 1)
    rate = (ratio ** (1 / MOMENTUM_WINDOW)).nan_to_num(0).clamp(0, MOMENTUM_MAX_RATE)
    return torch.where(known, 2 / (1 + torch.sqrt(1 - rate)), 1)


def solve(
    geometry,
    a: torch.Tensor,
    b: torch.Tensor,
    f0: torch.Tensor,
    table: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    method: str,
    rho: torch.Tensor | None = None,
    potentials: torch.Tensor | None = None,
    momentum: float | str = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run Sinkhorn iterations from ``f0`` on any geometry: the torch backend's loop.

    Args:
        geometry: the cost (:mod:`sinkhorn_ot.geometry`), batched ``(B, N, M)``.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses; zeros mark padding.
        f0: ``(B, N)`` initial row potential.
        table: ``(B, S)`` eps of every iteration (:func:`eps_table`): iteration ``t``
            uses column ``min(t, S - 1)``, and problems may stop only from ``S - 1`` on.
        max_iter: number of (row, column) update pairs at most.
        tol: stop a problem once its relative L1 marginal violation is ``<= tol``;
            ``None`` runs exactly ``max_iter`` iterations.
        method: ``"log"`` or ``"kernel"``.
        rho: ``(B, 2)`` relaxation ``(rho_a, rho_b)`` (``inf`` = hard) or ``None``
            (balanced): the half-steps are damped by ``rho / (rho + eps_t)``
            (:mod:`sinkhorn_ot._unbalanced`).
        potentials: ``(B,)`` bool, problems that stop on the sup-norm change of their
            potentials (:func:`sinkhorn_ot._unbalanced.potential_change`) instead of
            the marginal violation; ``None``: none does.
        momentum: ``1.0`` (plain Sinkhorn), a factor ``omega`` in (0, 2) or ``"auto"``:
            over-relaxation at the target eps once a problem's error is at most
            ``MOMENTUM_THRESHOLD`` (balanced problems; the rule is in
            ``csrc/loop_rules.h``): each half-step moves its potential ``omega`` of the
            way to its update, and the violation adds the column marginal's.

    Returns:
        ``f (B, N)``, ``g (B, M)``, ``n_iter (B,)`` int64, ``err (B,)`` float64: the
        final potentials (not yet normalised), the iterations each problem ran and the
        stopping measure of the returned ``(f, g)``.

    Raises:
        KernelUnderflowError: a kernel-form potential became non-finite.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import PointCloud
        >>> from sinkhorn_ot._loop import solve
        >>> a, b = torch.full((1, 5), 0.2), torch.full((1, 4), 0.25)
        >>> f, g, n_iter, err = solve(PointCloud(torch.randn(1, 5, 2), torch.randn(1, 4, 2)),
        ...     a, b, torch.zeros(1, 5), torch.ones(1, 1), max_iter=200, tol=1e-5, method="log")
        >>> f.shape, g.shape, bool(err[0] <= 1e-5)
        (torch.Size([1, 5]), torch.Size([1, 4]), True)
    """
    batch = geometry.shape[0]
    device = f0.device
    log_a, log_b = safe_log(a), safe_log(b)
    mass = a.sum(-1, dtype=torch.float64)
    last_column = table.shape[1] - 1

    def eps_at(t: int) -> torch.Tensor:
        return table[:, min(t, last_column)].unsqueeze(-1)  # (B, 1)

    def step_at(t: int):
        # "stabilised" is a native implementation of the log-domain iterates.
        make = geometry.kernel_step if method == "kernel" else geometry.log_step
        e = eps_at(t)
        return make(log_a, log_b, e, damping(rho, e))

    step = step_at(0)
    f = f0
    g = step.col(f)
    g_plain = g  # col(f): g before a momentum blend, for the column violation
    n_iter = torch.zeros(batch, dtype=torch.int64, device=device)
    err = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    adaptive = momentum == "auto"
    blended = adaptive or momentum != 1.0
    ones = torch.ones(batch, 1, dtype=f0.dtype, device=device)
    omega = ones
    # Per problem: the iteration at which momentum engaged (its error first at most
    # MOMENTUM_THRESHOLD at the target eps), -1 before; "auto" then measures the rate
    # of MOMENTUM_WINDOW plain iterations from there.
    engaged = torch.full((batch,), -1, dtype=torch.int64, device=device)
    window_err = err
    for t in range(max_iter + 1):
        if 0 < t <= last_column:
            step = step_at(t)
        f_next = step.row(g)
        last = t == max_iter
        if tol is not None or last or blended:
            with torch.no_grad():
                violation = row_violation(f, f_next, a, eps_at(t), mass)
                if blended:
                    violation = violation + column_violation(g, g_plain, b, eps_at(t), mass)
                if potentials is not None:
                    change = potential_change(f, f_next, a, eps_at(t))
                    violation = torch.where(potentials, change, violation)
                if not bool(torch.isfinite(violation[active]).all()):
                    _raise_non_finite(method)
                err = torch.where(active, violation, err)
                if blended and t >= last_column:
                    start = (engaged < 0) & (violation <= MOMENTUM_THRESHOLD)
                    engaged = torch.where(start, t, engaged)
                    if adaptive:
                        window_err = torch.where(start, violation, window_err)
                        now = (engaged >= 0) & (t == engaged + MOMENTUM_WINDOW)
                        rate_omega = momentum_from_rate(violation, window_err).to(f0.dtype)
                        omega = torch.where(now.unsqueeze(-1), rate_omega.unsqueeze(-1), omega)
                    else:
                        omega = torch.where((engaged >= 0).unsqueeze(-1), float(momentum), ones)
                if tol is not None and t >= last_column:
                    active = active & ~(violation <= tol)
            if last or not bool(active.any()):
                break
        keep = active.unsqueeze(-1)
        if blended and t >= last_column:  # padding takes the plain update
            f = torch.where(keep, torch.where(a > 0, f + omega * (f_next - f), f_next), f)
            g_plain = step.col(f)
            g = torch.where(keep, torch.where(b > 0, g + omega * (g_plain - g), g_plain), g)
        else:
            f = torch.where(keep, f_next, f)
            g = torch.where(keep, step.col(f), g)
            g_plain = g
        n_iter += active
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(g).all())):
        _raise_non_finite(method)
    return f, g, n_iter, err
