"""A differentiable soft-min over point clouds whose backward stores no cost block.

``f_i = -eps log sum_j exp(h_j - C(x_i, y_j) / eps)`` for fixed ``h`` and ``y``: the
last, differentiated half-step of :func:`sinkhorn_ot.sinkhorn_divergence`. Plain autograd
through :class:`sinkhorn_ot.geometry.BlockLogStep` would keep every cost block for the
backward (``O(N M)`` memory); here the backward recomputes one block at a time, turns it
into the soft-max weights ``w_ij = exp(h_j - C_ij / eps + f_i / eps)`` and sends
``sum_j grad_i w_ij dC_ij / dx_i`` to the points through
:meth:`sinkhorn_ot.geometry.PointCloud.cost_vjp`, so memory stays ``O((N + M) D)`` plus
one block.
"""

from __future__ import annotations

import torch

from ._absorbed_softmin import AbsorbedSoftmin
from .geometry import PointCloud


def _row_softmin(geometry: PointCloud, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    e = eps.unsqueeze(-1)  # (B, 1, 1)
    parts = [
        torch.logsumexp(h.unsqueeze(1) - geometry.cost_block(i0, i1) / e, dim=2)
        for i0, i1 in geometry.blocks()
    ]
    return -eps * torch.cat(parts, dim=1)


class _PointSoftmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, geometry, h, eps, guess, native_lengths):
        with torch.no_grad():
            if native_lengths is not None:
                f = _native_row_softmin(geometry, h, eps, native_lengths)
            elif geometry.cost == "sqeuclidean":
                f = _absorbed(geometry, h).row(torch.zeros_like(h), eps, guess)
            else:
                f = _row_softmin(geometry, h, eps)
        ctx.geometry = geometry
        # The backward's soft-max weights exp(h_j + (f_i - C_ij) / eps): padding rows,
        # which the native kernel leaves at 0, get f = -inf there, so their weights are
        # exactly 0 (their incoming gradient is 0, and 0 * exp(overflow) would be NaN).
        f_weights = f if native_lengths is None else _without_padding_rows(f, native_lengths)
        ctx.save_for_backward(h, eps, f_weights)
        return f

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_f):
        h, eps, f = ctx.saved_tensors
        geometry = ctx.geometry
        if geometry.cost == "sqeuclidean":
            grad_x = _absorbed(geometry, h).row_gradient(torch.zeros_like(h), eps, f, grad_f)
            return grad_x, None, None, None, None, None
        e = eps.unsqueeze(-1)
        grad_x = None
        for i0, i1 in geometry.blocks():
            with torch.no_grad():
                logits = h.unsqueeze(1) - geometry.cost_block(i0, i1) / e
                weight = grad_f[:, i0:i1].unsqueeze(-1) * torch.exp(
                    logits + f[:, i0:i1].unsqueeze(-1) / e
                )
            part, _ = geometry.cost_vjp(i0, i1, weight)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x, None, None, None, None, None


def _native_row_softmin(geometry: PointCloud, h, eps, lengths) -> torch.Tensor:
    """The soft-min on :func:`sinkhorn_ot.ops.point_softmin`: rows ``>= lengths`` are 0
    and the trailing dropped columns (``h = -inf``) are skipped."""
    from . import ops

    return ops.point_softmin(
        geometry.x,
        geometry.y,
        eps * h,
        eps.reshape(-1).expand(h.shape[0]).contiguous(),
        cost=geometry.cost,
        cost_scale=geometry.cost_scale,
        row_lengths=lengths,
    )


def _without_padding_rows(f: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(f.shape[1], device=f.device)
    return torch.where(rows < lengths.unsqueeze(-1), f, float("-inf"))


def _absorbed(geometry: PointCloud, h: torch.Tensor) -> AbsorbedSoftmin:
    """The soft-min of ``h`` as :class:`AbsorbedSoftmin` (log weights ``h``, ``g = 0``);
    the points are the ones given, uncentred (the caller centres them)."""
    batch, _, m = geometry.shape
    return AbsorbedSoftmin(
        geometry.x,
        geometry.y,
        h,
        geometry.cost_scale,
        block_rows=geometry.block_elements // max(1, batch * m),
    )


def point_softmin(
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    eps: torch.Tensor,
    *,
    cost: str,
    scale: float,
    block_elements: int,
    guess: torch.Tensor | None = None,
    native_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``-eps log sum_j exp(h_j - scale c(x_i, y_j) / eps)``, differentiable w.r.t. ``x``.

    Args:
        x: ``(B, N, D)`` (gradients flow to it).
        y: ``(B, M, D)`` (treated as a constant).
        h: ``(B, M)`` log weights plus potentials over eps (a constant), ``-inf`` allowed.
        eps: ``(B, 1)``.
        cost, scale, block_elements: as :class:`sinkhorn_ot.PointCloud`.
        guess: ``(B, N)`` an estimate of the result (the current potential), which keeps
            the squared Euclidean path's sums near 1 (:mod:`sinkhorn_ot._absorbed_softmin`).
        native_lengths: ``None``, or ``(B,)`` int64 row lengths: the values come from
            the native kernel (:func:`sinkhorn_ot.ops.point_softmin`), which skips the
            padding (rows ``>= native_lengths`` are 0, with zero gradient).

    Returns:
        ``(B, N)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._softmin_grad import point_softmin
        >>> x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
        >>> y, h = torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        >>> eps = torch.full((2, 1), 0.5, dtype=torch.float64)
        >>> f = point_softmin(x, y, h, eps, cost="sqeuclidean", scale=0.5, block_elements=8)
        >>> dense = -0.5 * torch.logsumexp(-((x[:, :, None] - y[:, None]) ** 2).sum(-1), 2)
        >>> bool(torch.allclose(f, dense))
        True
        >>> check = torch.autograd.gradcheck(
        ...     lambda p: point_softmin(p, y, h, eps, cost="sqeuclidean", scale=0.5,
        ...                             block_elements=8), (x,))
        >>> check
        True
    """
    geometry = PointCloud(x.detach(), y.detach(), cost, scale=scale, block_elements=block_elements)
    guess = torch.zeros_like(x[..., 0]) if guess is None else guess.detach()
    return _PointSoftmin.apply(x, geometry, h.detach(), eps.detach(), guess, native_lengths)
