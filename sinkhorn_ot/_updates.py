"""Pure-PyTorch Sinkhorn half-steps in the log domain and in kernel form.

Both forms act on the same potentials ``f (B, N)``, ``g (B, M)`` of the plan
``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` and compute the same maps

* ``col(f)``: ``g_j = -eps * log sum_i a_i exp((f_i - C_ij) / eps)`` (column marginal = b)
* ``row(g)``: ``f_i = -eps * log sum_j b_j exp((g_j - C_ij) / eps)`` (row marginal = a)

The log form evaluates them with a max-shifted log-sum-exp and never under- or
overflows. The kernel form precomputes ``K = exp(-C / eps)`` and needs one batched
matrix-vector product per half-step (the u, v scalings of Sinkhorn-Knopp: ``u = a *
exp(f / eps)``, ``v = b * exp(g / eps)``), which is faster but underflows when
``C / eps`` is large; a non-finite potential is how that shows.

Zero weights enter as ``log 0 = -inf`` and drop out of every sum, so the potentials
of padded rows/columns stay finite.

Unbalanced problems (:mod:`sinkhorn_ot._unbalanced`) pass ``damping = (tau_a, tau_b)``:
each soft-min is multiplied by the damping of its side, ``row`` by ``tau_a`` and ``col``
by ``tau_b``; ``None`` (balanced) leaves the maps as above.
"""

from __future__ import annotations

import torch


class LogStep:
    """Log-domain half-steps for one value of eps.

    Args:
        C: cost, ``(B, N, M)``.
        log_a: ``(B, N)``, ``-inf`` where ``a == 0``.
        log_b: ``(B, M)``.
        eps: ``(B, 1)``.
    """

    def __init__(
        self,
        C: torch.Tensor,
        log_a: torch.Tensor,
        log_b: torch.Tensor,
        eps: torch.Tensor,
        damping: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.C_over_eps = C / eps.unsqueeze(-1)  # (B, N, M)
        self.log_a, self.log_b, self.eps = log_a, log_b, eps
        self.damping = damping

    def row(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, M) -> (B, N)``: the f that meets the row marginal given g."""
        scores = (self.log_b + g / self.eps).unsqueeze(1) - self.C_over_eps  # (B, N, M)
        return damped(-self.eps * torch.logsumexp(scores, dim=2), self.damping, 0)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, N) -> (B, M)``: the g that meets the column marginal given f."""
        return damped(-self.eps * self.col_lse(f), self.damping, 1)

    def col_lse(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, N) -> (B, M)``: ``log sum_i a_i exp((f_i - C_ij) / eps)`` over these rows.

        The partial reduction behind :meth:`col`: a solve whose rows are split over
        processes combines the ranks' values (:mod:`sinkhorn_ot.distributed`).
        """
        scores = (self.log_a + f / self.eps).unsqueeze(2) - self.C_over_eps  # (B, N, M)
        return torch.logsumexp(scores, dim=1)


class KernelStep:
    """Kernel-form half-steps (``K = exp(-C / eps)``) for one value of eps.

    Same arguments and maps as :class:`LogStep`.
    """

    def __init__(
        self,
        C: torch.Tensor,
        log_a: torch.Tensor,
        log_b: torch.Tensor,
        eps: torch.Tensor,
        damping: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.K = torch.exp(-C / eps.unsqueeze(-1))  # (B, N, M)
        self.log_a, self.log_b, self.eps = log_a, log_b, eps
        self.damping = damping

    def row(self, g: torch.Tensor) -> torch.Tensor:
        v = torch.exp(self.log_b + g / self.eps)  # (B, M): b * exp(g / eps)
        Kv = torch.bmm(self.K, v.unsqueeze(-1)).squeeze(-1)  # (B, N)
        return damped(-self.eps * torch.log(Kv), self.damping, 0)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        u = torch.exp(self.log_a + f / self.eps)  # (B, N): a * exp(f / eps)
        Ktu = torch.bmm(u.unsqueeze(1), self.K).squeeze(1)  # (B, M)
        return damped(-self.eps * torch.log(Ktu), self.damping, 1)


STEPS = {"log": LogStep, "kernel": KernelStep}


def damped(softmin: torch.Tensor, damping, side: int) -> torch.Tensor:
    """``tau * softmin`` for the side ``side`` (0: rows, 1: columns) of ``damping``.

    ``damping`` is ``None`` (balanced: returned as is) or ``(tau_a, tau_b)``, ``(B, 1)``.
    """
    return softmin if damping is None else softmin * damping[side]


def safe_log(w: torch.Tensor) -> torch.Tensor:
    """``log w`` with ``-inf`` at zeros and a zero (not NaN) gradient there."""
    positive = w > 0
    return torch.where(positive, torch.where(positive, w, 1).log(), float("-inf"))


def log_plan(
    C: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """``P = a_i b_j exp((f_i + g_j - C_ij) / eps)``, ``(B, N, M)``; exactly 0 on padding."""
    e = eps.unsqueeze(-1)  # (B, 1, 1)
    logits = (f.unsqueeze(2) + g.unsqueeze(1) - C) / e
    return torch.exp(log_a.unsqueeze(2) + log_b.unsqueeze(1) + logits)


def row_violation(
    f: torch.Tensor, f_next: torch.Tensor, a: torch.Tensor, eps: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor:
    """L1 marginal violation of the plan of ``(f, g)``, relative to the total mass.

    The plan of ``(f, g)`` with ``g = col(f)`` meets the column marginal exactly, and
    its row sums are ``a_i exp((f_i - f_next_i) / eps)`` where ``f_next = row(g)``. So
    the violation comes for free with the next row update. Accumulated in float64 so
    that float32 problems can reach small tolerances.

    Args:
        f, f_next: ``(B, N)``.
        a: ``(B, N)``.
        eps: ``(B, 1)``.
        mass: ``(B,)`` float64 total mass.

    Returns:
        ``(B,)`` float64.
    """
    ratio = torch.expm1((f.double() - f_next.double()) / eps.double())  # (B, N)
    # Padded rows (a = 0) may have inf ratios at tiny eps; they carry no mass.
    return torch.where(a > 0, a.double() * ratio.abs(), 0).sum(-1) / mass


def column_violation(
    g: torch.Tensor, g_plain: torch.Tensor, b: torch.Tensor, eps: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor:
    """L1 column-marginal violation of the plan of ``(f, g)``, relative to the mass.

    Its column sums are ``b_j exp((g_j - g_plain_j) / eps)`` with ``g_plain = col(f)``;
    zero when ``g`` is ``col(f)`` (plain Sinkhorn). Momentum blends ``g`` away from it.

    Args:
        g, g_plain: ``(B, M)``.
        b: ``(B, M)``.
        eps: ``(B, 1)``.
        mass: ``(B,)`` float64 total mass.

    Returns:
        ``(B,)`` float64.
    """
    return row_violation(g, g_plain, b, eps, mass)
