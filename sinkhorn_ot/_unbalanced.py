"""Unbalanced (KL-relaxed) marginals: the relaxation, its damping and its dual value.

A problem may relax either marginal with a strength ``rho`` (``inf`` = hard constraint):

    min_P <C, P> + eps KL(P | a b^T) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)

with the generalised ``KL(p | q) = sum p log(p / q) - p + q``. Its Sinkhorn half-steps
are the balanced soft-mins multiplied by the damping ``tau = rho / (rho + eps)`` of their
side (``tau = 1`` for a hard side), so every backend changes only where it finishes a
soft-min. The relaxation of a batch travels as one ``(B, 2)`` tensor ``rho`` of
``(rho_a, rho_b)`` per problem, or ``None`` when every problem is balanced (then every
path is bit for bit what it was).

Stopping rule: a relaxed problem has no exact marginal to test, so it stops on the
sup-norm change of its row potential over one iteration relative to eps,
``max_i |f_next_i - f_i| / eps`` over the rows with ``a_i > 0`` (``csrc/loop_rules.h``
has the same rule for the native loops). A balanced problem can opt into it with
``stop="potentials"``.

Example:
    >>> import torch
    >>> from sinkhorn_ot._unbalanced import damping
    >>> rho = torch.tensor([[float("inf"), 1.0]])
    >>> damping(rho, torch.tensor([[0.25]]))
    (tensor([[1.]]), tensor([[0.8000]]))
"""

from __future__ import annotations

import math
import numbers

import torch

from .options import STOP_RULES  # noqa: F401  (re-exported: the ``stop`` values)


def check_rho(name: str, rho: object, batch: int, batched: bool, ref: torch.Tensor):
    """Validate ``rho_a`` / ``rho_b``: ``None``, a float or a ``(B,)`` tensor, ``> 0``.

    ``inf`` (or ``None``) means a hard constraint. Returns ``None`` or a ``(B,)`` tensor
    on ``ref``'s device (its dtype, or float64 for a Python float).
    """
    if rho is None:
        return None
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real | torch.Tensor):
        raise TypeError(
            f"`{name}` must be None, a positive float or a (B,) tensor, got {type(rho).__name__}"
        )
    if isinstance(rho, torch.Tensor):
        if not rho.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got dtype {rho.dtype}")
        if rho.device != ref.device:
            raise ValueError(
                f"`{name}` must be on the same device as `C` ({ref.device}), got {rho.device}"
            )
        if rho.dim() == 0:
            rho = rho.expand(batch)
        elif tuple(rho.shape) != (batch,) or not batched:
            expected = f"(B,) = ({batch},)" if batched else "a scalar"
            raise ValueError(f"`{name}` must be {expected}, got shape {tuple(rho.shape)}")
        values = rho.detach()
        bad = ~(values > 0)  # NaN, zero and negative values
        if bool(bad.any()):
            first = float(values[bad][0])
            raise ValueError(
                f"`{name}` must be > 0 (inf or None for a hard marginal), got {first!r}"
            )
        return rho
    value = float(rho)
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0 (inf or None for a hard marginal), got {value!r}")
    return torch.full((batch,), value, dtype=torch.float64, device=ref.device)


def relaxation(rho_a, rho_b, batch: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """``(B, 2)`` of ``(rho_a, rho_b)`` in ``dtype`` (``inf`` = hard), ``None`` if all hard."""
    if rho_a is None and rho_b is None:
        return None
    inf = torch.full((batch,), math.inf, dtype=dtype, device=device)
    sides = [inf if r is None else r.to(dtype) for r in (rho_a, rho_b)]
    rho = torch.stack(sides, dim=-1)
    if bool(torch.isinf(rho.detach()).all()):
        return None
    return rho


def relaxed_problems(rho: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """``(B,)`` bool: problems with at least one relaxed side."""
    if rho is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.isfinite(rho.detach()).any(-1)


def damping(rho: torch.Tensor | None, eps: torch.Tensor):
    """``(tau_a, tau_b)``, each ``(B, 1)``: ``rho / (rho + eps)``, exactly 1 where ``rho = inf``.

    Args:
        rho: ``(B, 2)`` or ``None`` (then ``None`` is returned: no damping).
        eps: ``(B, 1)``, the eps of the half-steps.
    """
    if rho is None:
        return None
    hard = torch.isinf(rho.detach())
    safe = torch.where(hard, 1, rho)  # no inf / inf, and a finite gradient for unroll
    tau = torch.where(hard, 1, safe / (safe + eps.to(rho.dtype)))
    return tau[:, :1].to(eps.dtype), tau[:, 1:].to(eps.dtype)


def inverse(rho: torch.Tensor) -> torch.Tensor:
    """``1 / rho`` with exactly 0 (and a zero gradient) for a hard side."""
    hard = torch.isinf(rho.detach())
    return torch.where(hard, 0, 1 / torch.where(hard, 1, rho))


def potential_change(f: torch.Tensor, f_next: torch.Tensor, a: torch.Tensor, eps: torch.Tensor):
    """``max_i |f_next_i - f_i| / eps`` over the rows with ``a_i > 0``, float64 ``(B,)``.

    The potentials rule of ``csrc/loop_rules.h`` (``potential_term``), in float64; a NaN
    propagates (the loop reports a non-finite potential).

    Example:
        >>> import torch
        >>> potential_change(torch.zeros(1, 2), torch.tensor([[0.1, -0.3]]),
        ...                  torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5]])).tolist()
        [0.6000000238418579]
    """
    change = (f_next.double() - f.double()).abs() / eps.double()
    change = torch.where(a > 0, change, 0)
    return change.amax(-1)


def side_value(w: torch.Tensor, p: torch.Tensor, inv_rho: torch.Tensor) -> torch.Tensor:
    """``<w, p>`` (hard side) or ``rho <w, 1 - exp(-p / rho)>`` (relaxed), ``(B,)``.

    The term of one marginal in the dual objective; ``inv_rho (B,)`` is ``1 / rho``.
    """
    hard = inv_rho.unsqueeze(-1) == 0
    safe = torch.where(hard, 1, inv_rho.unsqueeze(-1))
    relaxed = -torch.expm1(-p * safe) / safe
    return (w * torch.where(hard, p, relaxed)).sum(-1)


def dual_value(f, g, a, b, eps, rho, plan_mass, row_total=None) -> torch.Tensor:
    """The dual objective of relaxed problems, ``(B,)``: their ``value``.

    ``phi_a(f) + phi_b(g) - eps (sum P - sum a sum b)`` with ``phi`` of
    :func:`side_value`; at the optimum it equals the primal objective
    ``<C, P> + eps KL(P | a b^T) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)``.
    ``row_total`` sums a sum over rows over ranks where ``f, a`` are one rank's rows
    (``None``: all rows; ``plan_mass`` is then already the total).
    """
    total = _itself if row_total is None else row_total
    inv = inverse(rho)
    mass_ab = total(a.sum(-1)) * b.sum(-1)
    phi_a = total(side_value(a, f, inv[:, 0]))
    return phi_a + side_value(b, g, inv[:, 1]) - eps * (plan_mass - mass_ab)


def _itself(t: torch.Tensor) -> torch.Tensor:
    return t


def hard_violation(rows, cols, a, b, rho, row_total=None) -> torch.Tensor:
    """Relative L1 violation of the hard marginals only, float64 ``(B,)`` (0 if none).

    ``row_total``: as in :func:`dual_value`, where ``rows, a`` are one rank's rows and
    ``cols`` is this rank's share of the column sums.
    """
    total = _itself if row_total is None else row_total
    a64, b64 = a.detach().double(), b.detach().double()
    cols = total(cols)
    gap_rows = total((rows - a64).abs().sum(-1))
    gap_cols = (cols - b64).abs().sum(-1)
    hard = torch.isinf(rho.detach())
    return torch.where(hard[:, 0], gap_rows / total(a64.sum(-1)), 0) + torch.where(
        hard[:, 1], gap_cols / b64.sum(-1), 0
    )
