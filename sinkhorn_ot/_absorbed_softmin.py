"""Row soft-mins of a squared Euclidean cost as one matrix product per block.

``T(g)_i = -eps log sum_j w_j exp((g_j - s |r_i - c_j|^2) / eps)``. With a guess ``u_i``
of the result (the current potential: the iterates change little from one update to the
next) every term of the sum is

    exp(alpha_i + beta_j + <2 s r_i / eps, c_j>),
    alpha_i = (u_i - s |r_i|^2) / eps,   beta_j = log w_j + (g_j - s |c_j|^2) / eps,

that is ``exp`` of one entry of the product of the augmented points ``[2 s r_i / eps,
alpha_i, 1]`` and ``[c_j, 1, beta_j]``, and ``T(g)_i = u_i - eps log(sum)``. One ``bmm``,
an in-place ``exp`` and a sum per block replace the cost, its division, the shift and the
log-sum-exp of the log-domain step (about three passes over the block instead of eight);
the guess keeps the sum near 1, so it neither overflows nor underflows. A row whose sum
does (a poor guess, far-away points) is recomputed by the max-shifted log-sum-exp.
Rounding: the exponent is formed from terms of size ``s |r|^2 / eps``, as GeomLoss's
tensorized ``|x|^2 + |y|^2 - 2 <x, y>`` cost is, a few ulps of it.
"""

from __future__ import annotations

import torch

#: Stands for log 0 in the augmented points: exp gives exactly 0, and no inf * 0 occurs.
_FAR_BELOW = {t: -0.25 * torch.finfo(t).max for t in (torch.float32, torch.float64)}
#: Exponents are cut here: exp of it is about 1e-35 (float32) or 1e-304 (float64) of the
#: sum, whose guess keeps it near 1 (a row whose sum is not is recomputed anyway).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


class AbsorbedSoftmin:
    """Row soft-mins of ``scale |r_i - c_j|^2`` for fixed points and column weights.

    Args:
        rows: ``(B, N, D)``; cols: ``(B, M, D)`` (detached, centred).
        log_w: ``(B, M)`` column log weights (``-inf`` on padding).
        scale: the cost factor ``s``.
        block_rows: rows per product (memory: ``B * block_rows * M`` entries).

    Example:
        >>> import torch
        >>> from sinkhorn_ot._absorbed_softmin import AbsorbedSoftmin
        >>> r, c = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
        >>> log_w, g = torch.full((2, 5), -5.0 ** 0.5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> eps = torch.full((2, 1), 0.1, dtype=torch.float64)
        >>> fast = AbsorbedSoftmin(r, c, log_w, 0.5, block_rows=4).row(g, eps, torch.zeros(2, 6, dtype=torch.float64))
        >>> cost = 0.5 * ((r[:, :, None] - c[:, None]) ** 2).sum(-1)
        >>> slow = -0.1 * torch.logsumexp(log_w[:, None] + (g[:, None] - cost) / 0.1, dim=2)
        >>> bool(torch.allclose(fast, slow, rtol=0, atol=1e-12))
        True
    """

    def __init__(self, rows, cols, log_w, scale: float, *, block_rows: int):
        self.rows, self.cols, self.scale = rows, cols, scale
        self.log_w = log_w.clamp_min(_FAR_BELOW[log_w.dtype])
        self.rows_sq = scale * (rows * rows).sum(-1)  # (B, N)
        self.cols_sq = scale * (cols * cols).sum(-1)  # (B, M)
        self.block_rows = max(1, block_rows)
        ones = rows.new_ones((*cols.shape[:2], 1))
        self._cols_head = torch.cat([cols, ones], dim=-1)  # (B, M, D + 1)

    def _exp_blocks(self, g, eps, guess):
        """``(i0, exp(E[:, i0:i1]))`` for the row blocks of the exponent matrix ``E``."""
        beta = self.log_w + (g - self.cols_sq) / eps  # (B, M)
        cols = torch.cat([self._cols_head, beta.unsqueeze(-1)], dim=-1)  # (B, M, D + 2)
        alpha = (guess - self.rows_sq) / eps  # (B, N)
        ones = alpha.new_ones((*alpha.shape, 1))
        rows = torch.cat(
            [self.rows * (2 * self.scale / eps).unsqueeze(-1), alpha.unsqueeze(-1), ones], -1
        )  # (B, N, D + 2)
        floor = _EXP_FLOOR[rows.dtype]
        # One buffer for every full block (the caller reduces each block before the next):
        # a fresh (B, block_rows, M) tensor per block leaves glibc's heap fragmented once
        # its mmap threshold has grown, and the resident memory then grows like B N M.
        batch, n = rows.shape[:2]
        full = rows.new_empty((batch, min(self.block_rows, n), cols.shape[1]))
        for i0 in range(0, n, self.block_rows):
            part = rows[:, i0 : i0 + self.block_rows]
            out = full if part.shape[1] == full.shape[1] else None
            block = torch.bmm(part, cols.transpose(1, 2), out=out)
            # Far below the sum's scale a term is 0 to rounding; exp is ten times slower
            # there (its underflow path), so it is cut at a floor instead.
            yield i0, block.clamp_min_(floor).exp_()

    def row(self, g: torch.Tensor, eps: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """``T(g)`` ``(B, N)`` for ``g (B, M)``, ``eps (B, 1)``, a guess ``(B, N)``."""
        total = torch.cat([block.sum(-1) for _, block in self._exp_blocks(g, eps, guess)], 1)
        out = guess - eps * torch.log(total)
        bad = ~(torch.isfinite(out) & (total > 0))
        if bool(bad.any()):
            out = torch.where(bad, self._safe_row(g, eps), out)
        return out

    def row_gradient(self, g, eps, f, grad_f) -> torch.Tensor:
        """``sum_j grad_f_i w_ij d(s |r_i - c_j|^2)/dr_i`` ``(B, N, D)`` with ``w_ij`` the
        soft-max weights of ``f = T(g)``: ``2 s grad_f_i (r_i sum_j w_ij - sum_j w_ij c_j)``.
        """
        parts = []
        for i0, block in self._exp_blocks(g, eps, f):
            rows = self.rows[:, i0 : i0 + block.shape[1]]
            moment = rows * block.sum(-1, keepdim=True) - torch.bmm(block, self.cols)
            parts.append(moment)
        return 2 * self.scale * grad_f.unsqueeze(-1) * torch.cat(parts, dim=1)

    def _safe_row(self, g, eps):
        from .geometry import PointCloud  # the rare fallback: blockwise log-sum-exp

        geometry = PointCloud(self.rows, self.cols, "sqeuclidean", scale=self.scale)
        return geometry.log_step(self.log_w, self.log_w, eps).row(g)
