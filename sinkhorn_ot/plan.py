"""The transport plan of a geometry whose cost is not stored: products, not a tensor.

For a :class:`~sinkhorn_ot.geometry.PointCloud` the plan
``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` would be as large as the cost, so
``sinkhorn`` returns a :class:`LazyPlan`: it computes ``P @ v``, ``P.T @ u``, the
marginals and ``<C, P>`` one row block at a time, and materialises ``P`` only when
asked (:meth:`LazyPlan.to_dense`). Under autograd each block is recomputed in the
backward pass (activation checkpointing), so gradients through these products need no
``(B, N, M)`` buffer either.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._updates import safe_log


class LazyPlan:
    """``P = a_i b_j exp((f_i + g_j - C_ij) / eps)`` of a geometry, applied block by block.

    Args:
        geometry: the problem's cost (batched ``(B, N, M)``).
        f: ``(B, N)``; g: ``(B, M)`` normalised potentials.
        a: ``(B, N)``; b: ``(B, M)`` weights.
        eps: ``(B,)``.
        batched: whether products take and return batched tensors.
        transposed: this object is ``P^T`` (``(B, M, N)``).

    Shapes (batched; an unbatched plan drops ``B``): ``plan @ v`` takes ``v (B, M)`` or
    ``(B, M, K)``; ``plan.T @ u`` takes ``u (B, N)`` or ``(B, N, K)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import PointCloud, sinkhorn
        >>> res = sinkhorn(PointCloud(torch.randn(6, 2), torch.randn(4, 2)), eps=1.0)
        >>> row, col = res.plan.marginals()
        >>> row.shape, col.shape, tuple((res.plan @ torch.ones(4)).shape)
        (torch.Size([6]), torch.Size([4]), (6,))
        >>> bool(torch.allclose(res.plan.T @ torch.ones(6), col))
        True
    """

    def __init__(self, geometry, f, g, a, b, eps, *, batched: bool = True, transposed=False):
        self.geometry, self.f, self.g, self.a, self.b, self.eps = geometry, f, g, a, b, eps
        self.batched, self.transposed = batched, transposed

    # ---------------------------------------------------------------- shape and views
    @property
    def shape(self) -> torch.Size:
        batch, n, m = self.geometry.shape
        dims = (m, n) if self.transposed else (n, m)
        return torch.Size((batch, *dims) if self.batched else dims)

    @property
    def dtype(self) -> torch.dtype:
        return self.f.dtype

    @property
    def device(self) -> torch.device:
        return self.f.device

    @property
    def T(self) -> LazyPlan:
        """The transposed plan ``(B, M, N)``."""
        return LazyPlan(
            self.geometry,
            self.f,
            self.g,
            self.a,
            self.b,
            self.eps,
            batched=self.batched,
            transposed=not self.transposed,
        )

    def __repr__(self) -> str:
        return f"LazyPlan(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    # ---------------------------------------------------------------- blocks
    def block(self, i0: int, i1: int, f=None, g=None) -> torch.Tensor:
        """Rows ``[i0, i1)`` of the (untransposed) plan, ``(B, i1 - i0, M)``."""
        f = self.f if f is None else f
        g = self.g if g is None else g
        e = self.eps.view(-1, 1, 1)
        logits = (f[:, i0:i1].unsqueeze(2) + g.unsqueeze(1) - self.geometry.cost_block(i0, i1)) / e
        log_w = safe_log(self.a[:, i0:i1]).unsqueeze(2) + safe_log(self.b).unsqueeze(1)
        # Padded pairs are exactly 0, even where their logits overflow (-inf + inf).
        real = log_w > float("-inf")
        return torch.where(real, torch.exp(torch.where(real, log_w + logits, 0)), 0)

    def _blockwise(self, fn, *tensors):
        """``fn(i0, i1, *tensors)`` for every row block, checkpointed under autograd."""
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*tensors, self.f, self.g, self.a, self.b, self.eps)
        )
        for i0, i1 in self.geometry.blocks():
            if needs_grad:
                yield checkpoint(fn, i0, i1, *tensors, use_reentrant=False)
            else:
                yield fn(i0, i1, *tensors)

    # ---------------------------------------------------------------- products
    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"a LazyPlan multiplies a torch.Tensor, got {type(v).__name__}")
        inner = self.shape[-1]
        vector = v.dim() == (2 if self.batched else 1)
        batched_v = v if self.batched else v.unsqueeze(0)
        if vector:
            batched_v = batched_v.unsqueeze(-1)
        if batched_v.dim() != 3 or batched_v.shape[1] != inner:
            lead = f"({self.shape[0]}, {inner})" if self.batched else f"({inner},)"
            raise ValueError(
                f"LazyPlan of shape {tuple(self.shape)} multiplies a {lead} vector or a matrix "
                f"with {inner} rows, got shape {tuple(v.shape)}"
            )
        batched_v = batched_v.to(self.dtype)
        out = self._transposed_product(batched_v) if self.transposed else self._product(batched_v)
        if vector:
            out = out.squeeze(-1)
        return out if self.batched else out.squeeze(0)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """``P v`` for ``v (B, M, K)``: ``(B, N, K)``."""
        parts = self._blockwise(lambda i0, i1, w: torch.bmm(self.block(i0, i1), w), v)
        return torch.cat(list(parts), dim=1)

    def _transposed_product(self, u: torch.Tensor) -> torch.Tensor:
        """``P^T u`` for ``u (B, N, K)``: ``(B, M, K)``."""
        parts = self._blockwise(
            lambda i0, i1, w: torch.bmm(self.block(i0, i1).transpose(1, 2), w[:, i0:i1]), u
        )
        return sum(parts)

    def marginals(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums ``(P 1, P^T 1)``: ``(B, N)`` and ``(B, M)`` (untransposed).

        Args:
            dtype: accumulate the sums in this dtype (e.g. float64 for a float32 plan);
                default the plan's dtype.
        """
        if dtype is None or dtype == self.dtype:
            batch, n, m = self.geometry.shape
            plain = LazyPlan(self.geometry, self.f, self.g, self.a, self.b, self.eps)
            rows = plain @ torch.ones(batch, m, dtype=self.dtype, device=self.device)
            cols = plain.T @ torch.ones(batch, n, dtype=self.dtype, device=self.device)
        else:
            row_parts, cols = [], 0
            for i0, i1 in self.geometry.blocks():
                block = self.block(i0, i1).to(dtype)
                row_parts.append(block.sum(2))
                cols = cols + block.sum(1)
            rows = torch.cat(row_parts, dim=1)
        if not self.batched:
            return rows[0], cols[0]
        return rows, cols

    def linear_value(self) -> torch.Tensor:
        """``<C, P>`` per problem, ``(B,)`` (``()`` unbatched)."""
        parts = self._blockwise(
            lambda i0, i1: (self.geometry.cost_block(i0, i1) * self.block(i0, i1)).sum((1, 2))
        )
        total = sum(parts)
        return total if self.batched else total[0]

    def to_dense(self) -> torch.Tensor:
        """The plan as a tensor ``(B, N, M)`` (or ``(B, M, N)`` transposed)."""
        dense = torch.cat(list(self._blockwise(self.block)), dim=1)
        if self.transposed:
            dense = dense.transpose(1, 2)
        return dense if self.batched else dense[0]

    def sum(self, dim=None) -> torch.Tensor:
        """Like ``Tensor.sum`` over the plan's own dimensions (``None``, -1 or -2)."""
        rows, cols = self.marginals()
        if self.transposed:
            rows, cols = cols, rows
        if dim is None:
            return rows.sum(-1)
        if dim in (-1, len(self.shape) - 1):
            return rows
        if dim in (-2, len(self.shape) - 2):
            return cols
        raise ValueError(f"LazyPlan.sum takes dim=None, -1 or -2, got {dim!r}")
