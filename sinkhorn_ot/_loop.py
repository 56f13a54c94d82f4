"""The Sinkhorn loop of the torch backend: potentials in, potentials out.

This is the reference every other backend must reproduce (same iterates, same
stopping decisions, same iteration counts). The native backends implement
:func:`solve_potentials` with the same signature and semantics.

Iteration scheme (DESIGN §3): ``g = col(f0)``; then each iteration is ``f = row(g)``
followed by ``g = col(f)``. Before each row update the marginal violation of the
current ``(f, g)`` is known for free (see :func:`_updates.row_violation`); a problem
whose violation is ``<= tol`` stops there, so its returned ``g`` is always ``col(f)``
and its plan meets the column marginal exactly (Algorithm 1, line 8).
"""

from __future__ import annotations

import torch

from ._updates import STEPS, row_violation, safe_log
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


def eps_table(eps: torch.Tensor, scale: torch.Tensor, eps_scaling: float | None) -> torch.Tensor:
    """The eps of every iteration, ``(B, S)``: iteration ``t`` uses column ``min(t, S - 1)``.

    The one schedule every backend runs (the native ops take this table, see
    ``csrc/loop_rules.h``). Without annealing ``S = 1`` and the table is ``eps``. With
    ``eps_scaling = s``, column ``t < S - 1`` is ``max(eps, eps0 * s**t)`` with ``eps0 =
    max(scale, eps)`` (the cost scale ``max |C_ij|`` of each problem), and the last column
    is ``eps``; problems may stop only once they reach it.

    Args:
        eps: ``(B,)`` target regularisation.
        scale: ``(B,)`` cost scale, ``max |C_ij|`` per problem (only read when annealing).
        eps_scaling: ``None`` or a factor in (0, 1).

    Returns:
        ``(B, S)`` in the dtype of ``eps``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._loop import eps_table
        >>> eps_table(torch.tensor([0.25]), torch.tensor([1.0]), 0.5).tolist()
        [[1.0, 0.5, 0.25]]
    """
    eps = eps.detach()
    if eps_scaling is None:
        return eps.unsqueeze(-1)
    eps0 = torch.maximum(scale.detach().to(eps.dtype), eps)
    ratio = (eps0 / eps).double().log().max().item()
    steps = int(torch.tensor(ratio / -torch.tensor(eps_scaling).log().item()).ceil().item())
    columns = [torch.maximum(eps, eps0 * eps_scaling**t) for t in range(steps)]
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
    """Run Sinkhorn iterations from ``f0``.

    Args:
        C: cost ``(B, N, M)``.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses; zeros mark padding.
        eps: ``(B,)`` target regularisation.
        f0: ``(B, N)`` initial row potential.
        max_iter: number of (row, column) update pairs at most.
        tol: stop a problem once its relative L1 marginal violation is ``<= tol``;
            ``None`` runs exactly ``max_iter`` iterations.
        method: ``"log"`` or ``"kernel"``.
        eps_scaling: optional annealing factor in (0, 1), see :func:`eps_schedule`.

    Returns:
        ``f (B, N)``, ``g (B, M)``, ``n_iter (B,)`` int64, ``err (B,)`` float64: the
        final potentials (not yet normalised), the iterations each problem ran and the
        violation of the returned ``(f, g)``.

    Raises:
        KernelUnderflowError: a kernel-form potential became non-finite.
    """
    batch = C.shape[0]
    log_a, log_b = safe_log(a), safe_log(b)
    mass = a.sum(-1, dtype=torch.float64)
    eps_col = eps.unsqueeze(-1)  # (B, 1)
    eps_start, anneal_steps = eps_schedule(eps, C, eps_scaling)
    step_cls = STEPS[method]

    def eps_at(t: int) -> torch.Tensor:
        if t >= anneal_steps:
            return eps_col
        return torch.maximum(eps_col, eps_start.unsqueeze(-1) * eps_scaling**t)

    step = step_cls(C, log_a, log_b, eps_at(0))
    f = f0
    g = step.col(f)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=C.device)
    err = torch.full((batch,), float("nan"), dtype=torch.float64, device=C.device)
    active = torch.ones(batch, dtype=torch.bool, device=C.device)
    for t in range(max_iter + 1):
        if 0 < t <= anneal_steps:
            step = step_cls(C, log_a, log_b, eps_at(t))
        f_next = step.row(g)
        last = t == max_iter
        if tol is not None or last:
            with torch.no_grad():
                violation = row_violation(f, f_next, a, eps_at(t), mass)
                if not bool(torch.isfinite(violation[active]).all()):
                    _raise_non_finite(method)
                err = torch.where(active, violation, err)
                if tol is not None and t >= anneal_steps:
                    active = active & ~(violation <= tol)
            if last or not bool(active.any()):
                break
        keep = active.unsqueeze(-1)
        f = torch.where(keep, f_next, f)
        g = torch.where(keep, step.col(f), g)
        n_iter += active
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(g).all())):
        _raise_non_finite(method)
    return f, g, n_iter, err
