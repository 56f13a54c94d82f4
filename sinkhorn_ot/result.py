"""The record returned by :func:`sinkhorn_ot.sinkhorn`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SinkhornResult:
    """Solution of a batch of entropic OT problems.

    Shapes are given for batched input; an unbatched ``(N, M)`` input drops the
    leading ``B`` everywhere (``value`` becomes a 0-d tensor). Names follow POT's
    ``OTResult`` where one exists.

    Attributes:
        plan: transport plan ``(B, N, M)``, ``a_i b_j exp((f_i + g_j - C_ij) / eps)``.
        f: row potentials ``(B, N)``, normalised so that ``<f, a> = <g, b>``.
        g: column potentials ``(B, M)``.
        value: regularised objective ``<f, a> + <g, b>`` ``(B,)``; at convergence it
            equals ``<C, P> + eps * KL(P || a b^T)``.
        value_linear: transport cost ``<C, P>`` ``(B,)``.
        n_iter: iterations run per problem ``(B,)`` int64.
        err: relative L1 marginal violation of ``plan`` ``(B,)`` float64.
        converged: ``err <= tol`` per problem ``(B,)`` bool (all True when ``tol=None``
            only if the violation is tiny; see ``sinkhorn``).
        method: ``"log"`` or ``"kernel"``, the form actually used.
        backend: ``"torch"`` or ``"native"``, the backend actually used.
        tol: the float ``converged`` refers to: the ``tol`` passed, what ``tol="auto"``
            resolved to (``1e-5``, or the float32 rounding floor where higher; see
            ``sinkhorn``), or ``1e-5`` for ``tol=None``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import sinkhorn
        >>> res = sinkhorn(torch.rand(3, 4), eps=0.1)
        >>> res.plan.shape, res.f.shape, res.g.shape
        (torch.Size([3, 4]), torch.Size([3]), torch.Size([4]))
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    value_linear: torch.Tensor
    n_iter: torch.Tensor
    err: torch.Tensor
    converged: torch.Tensor
    method: str
    backend: str
    tol: float = 1e-5

    @property
    def potentials(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, g)``, as POT's ``OTResult.potentials``."""
        return self.f, self.g
