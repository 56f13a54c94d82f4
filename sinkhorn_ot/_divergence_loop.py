"""The engine of :func:`sinkhorn_ot.sinkhorn_divergence`: one stacked, symmetric loop.

A debiased divergence needs four potentials: ``f_ba`` (on ``x``) and ``g_ab`` (on ``y``)
of OT(α, β), ``f_aa`` of OT(α, α) and ``g_bb`` of OT(β, β). Each is the row soft-min of
one problem, ``T(h)_i = -eps log sum_j w_j exp((h_j - C(r_i, c_j)) / eps)``, on rows ``r``
and columns ``c``:

====== ====== ====== ===================
part   rows   cols   input potential
====== ====== ====== ===================
f_ba   x      y      g_ab (weights b)
g_ab   y      x      f_ba (weights a)
f_aa   x      x      f_aa (weights a)
g_bb   y      y      g_bb (weights b)
====== ====== ====== ===================

so all four are one row half-step of a single geometry whose batch stacks the four
problems (``4 B`` problems of size ``K x K``, ``K = max(N, M)``, the short side padded
with zero weights). With ``debias=False`` only the first two are stacked.

The iterations are GeomLoss's (``sinkhorn_loop``): a start ``P = tau T(0)`` at the first
temperature, then for each temperature of the list the symmetric (averaged) update
``P <- (P + tau T(P'))/2`` (``P'``: the input potentials of the table), with the damping
``tau = 1 / (1 + eps / rho)`` of unbalanced OT (``tau = 1`` when balanced), and a last
update ``tau T(P')`` at the target temperature with the inputs detached: the envelope
gradient (only the cost's dependence on the row points is differentiated, as GeomLoss
does with ``C(x, y.detach())``). Everything but that last update runs without autograd.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import ops
from ._absorbed_softmin import AbsorbedSoftmin
from ._softmin_grad import point_softmin
from ._updates import LogStep, safe_log
from .errors import SinkhornConvergenceWarning
from .geometry import PointCloud

#: A stacked point-cloud cost is stored during the loop while it has at most this many
#: entries (128 MiB in float64): recomputing it at every update is slower.
STORE_COST_ELEMENTS = 1 << 24


@dataclass
class Stack:
    """The parts of one divergence as one batch of ``parts * B`` row soft-min problems.

    Attributes:
        rows, cols: ``(P B, K, D)`` points (point clouds) or ``None``.
        cost: ``(P B, K, K)`` stored cost (dense inputs, or small point clouds) or ``None``.
        row_weights, col_weights: ``(P B, K)``; zero on padding.
        parts: ``P``, 2 (OT(α, β) only) or 4 (debiased).
        sizes: ``(N, M)``.
    """

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    cost: torch.Tensor | None
    row_weights: torch.Tensor
    col_weights: torch.Tensor
    parts: int
    sizes: tuple[int, int]


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` zero-padded along dimension 1 to ``size``."""
    if t.shape[1] == size:
        return t
    shape = (t.shape[0], size - t.shape[1], *t.shape[2:])
    return torch.cat([t, t.new_zeros(shape)], dim=1)


def _swap_halves(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The input potentials of every part from the parts' outputs (swap f_ba, g_ab)."""
    return torch.cat([t[batch : 2 * batch], t[:batch], t[2 * batch :]])


def _weights(a, b, parts, size):
    A, Bw = _pad(a, size), _pad(b, size)
    rows = torch.cat([A, Bw, A, Bw][:parts])
    cols = torch.cat([Bw, A, A, Bw][:parts])
    return rows, cols


def centred(x, y, a, b):
    """Points moved by the (detached) centre of the weighted ones; zero-weight points at
    the centre, so that neither their place nor padding changes any rounding or overflows.
    """
    real_x, real_y = (a > 0).unsqueeze(-1), (b > 0).unsqueeze(-1)
    with torch.no_grad():
        total = (x * real_x).sum(1) + (y * real_y).sum(1)
        count = real_x.sum(1) + real_y.sum(1)
        centre = (total / count).unsqueeze(1)  # (B, 1, D)
    return torch.where(real_x, x - centre, 0), torch.where(real_y, y - centre, 0)


def stack_points(x, y, a, b, *, debias: bool, cost: str, scale: float, store: bool | None):
    """The :class:`Stack` of point clouds ``x (B, N, D)``, ``y (B, M, D)`` (centred)."""
    batch, n, _ = x.shape
    m = y.shape[1]
    size, parts = max(n, m), 4 if debias else 2
    X, Y = _pad(x.detach(), size), _pad(y.detach(), size)
    rows = torch.cat([X, Y, X, Y][:parts])
    cols = torch.cat([Y, X, X, Y][:parts])
    row_weights, col_weights = _weights(a.detach(), b.detach(), parts, size)
    stored = None
    if store is None:  # the squared Euclidean cost has a faster path without it
        store = cost != "sqeuclidean" and parts * batch * size * size <= STORE_COST_ELEMENTS
    if store:
        with torch.no_grad():
            stored = PointCloud(rows, cols, cost, scale=scale).dense()
    return Stack(rows, cols, stored, row_weights, col_weights, parts, (n, m))


def stack_costs(C_xy, C_xx, C_yy, a, b, *, debias: bool, differentiable: bool):
    """The stacked cost of given costs ``C_xy (B, N, M)``, ``C_xx (B, N, N)``, ``C_yy``.

    With ``differentiable``, every part carries half the gradient of its cost: ``C_xy``
    enters both ``f_ba`` and ``g_ab`` (so its gradient is the mean of their two plans,
    the plan at convergence), and a self cost enters its part once for a term
    ``OT / 2``. (Point clouds differentiate ``C(x, y.detach())`` and ``C(y,
    x.detach())`` instead, as GeomLoss does: the same gradient at convergence.)
    """
    _, n, m = C_xy.shape
    size, parts = max(n, m), 4 if debias else 2

    def square(C):
        C = _pad(C, size)
        return _pad(C.transpose(1, 2), size).transpose(1, 2)

    def halved(C):  # same values, half the gradient
        return 0.5 * (C + C.detach()) if differentiable else C.detach()

    blocks = [square(halved(C_xy)), square(halved(C_xy.transpose(1, 2)))]
    if debias:
        blocks += [square(halved(C_xx)), square(halved(C_yy))]
    row_weights, col_weights = _weights(a.detach(), b.detach(), parts, size)
    return Stack(None, None, torch.cat(blocks), row_weights, col_weights, parts, (n, m))


def damping(eps: torch.Tensor, rho: float | None) -> torch.Tensor | float:
    """``1 / (1 + eps / rho)``: the unbalanced soft-min's factor (1 when balanced)."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


@dataclass
class LoopInfo:
    """``n_iter (B,)``: updates run; ``err (B,)`` float64: fixed-point residual (the
    converged mode only, else NaN)."""

    n_iter: torch.Tensor
    err: torch.Tensor


class SymmetricLoop:
    """GeomLoss's symmetric, annealed Sinkhorn loop on a :class:`Stack`.

    Args:
        stack: the stacked problems.
        table: ``(B, S)`` temperatures of every divergence problem; lengths ``(B,)``.
        rho: ``None`` (balanced) or the marginal penalty.
        cost, scale, block_elements: the point-cloud cost (ignored for a stored cost).
        native: run the point-cloud half-steps on the native kernel
            (:func:`sinkhorn_ot.ops.point_softmin`) instead of torch's ops.
    """

    def __init__(
        self, stack: Stack, table, lengths, rho, *, cost, scale, block_elements, native=False
    ):
        self.stack, self.rho, self.native = stack, rho, native
        self.batch = table.shape[0]
        self.table = table.repeat(stack.parts, 1)  # (P B, S): part-major like the stack
        self.lengths = lengths.to(table.device).repeat(stack.parts)
        self.log_cols = safe_log(stack.col_weights)
        # Rows past a part's last weighted point are padding: the native kernel skips
        # them (and its trailing dropped columns), so a ragged batch costs its real pairs.
        self.row_lengths = kept_lengths(stack.row_weights) if native else None
        self.cost, self.scale, self.block_elements = cost, scale, block_elements
        self._absorbed = {}

    def _step(self, eps: torch.Tensor, part: slice = slice(None)):
        """The row soft-min at ``eps`` of the stacked problems ``part``, as
        ``step(g, guess)``."""
        log_cols = self.log_cols[part]
        if self.stack.cost is not None:
            row = LogStep(self.stack.cost[part], log_cols, log_cols, eps).row
            return lambda g, guess: row(g)
        rows, cols = self.stack.rows[part], self.stack.cols[part]
        if self.native:
            flat_eps = eps.reshape(-1).expand(rows.shape[0]).contiguous()
            lengths = self.row_lengths[part]

            def native_row(g, guess):
                h = g + eps * log_cols  # -inf on zero weights
                return ops.point_softmin(
                    rows, cols, h, flat_eps, cost=self.cost, cost_scale=self.scale,
                    row_lengths=lengths,
                )  # fmt: skip

            return native_row
        if self.cost == "sqeuclidean":
            key = (part.start, part.stop)
            if key not in self._absorbed:
                batch, size = log_cols.shape
                self._absorbed[key] = AbsorbedSoftmin(
                    rows,
                    cols,
                    log_cols,
                    self.scale,
                    block_rows=self.block_elements // max(1, batch * size),
                )
            absorbed = self._absorbed[key]
            return lambda g, guess: absorbed.row(g, eps, guess)
        geometry = PointCloud(
            rows, cols, self.cost, scale=self.scale, block_elements=self.block_elements
        )
        row = geometry.log_step(log_cols, log_cols, eps).row
        return lambda g, guess: row(g)

    def update(self, state: torch.Tensor, eps: torch.Tensor, step=None) -> torch.Tensor:
        """``tau T(P')``: every part's soft-min of its input potentials."""
        step = self._step(eps) if step is None else step
        tau = damping(eps, self.rho)
        return tau * step(_swap_halves(state, self.batch), state / tau)

    @torch.no_grad()
    def anneal(self) -> torch.Tensor:
        """Potentials ``(P B, K)`` after the whole temperature list."""
        eps = self.table[:, :1]
        step = self._step(eps)
        zeros = torch.zeros_like(self.log_cols)
        state = damping(eps, self.rho) * step(zeros, zeros)
        for t in range(self.table.shape[1]):
            eps = self.table[:, t : t + 1]
            if t > 0:
                step = self._step(eps)
            averaged = 0.5 * (state + self.update(state, eps, step))
            state = torch.where((t < self.lengths).unsqueeze(-1), averaged, state)
        return state

    @torch.no_grad()
    def converge(
        self, state: torch.Tensor, eps: torch.Tensor, tol: float, max_iter: int
    ) -> tuple[torch.Tensor, LoopInfo]:
        """Continue the updates at the target ``eps (P B, 1)`` until the
        fixed-point residual ``sum_i w_i |exp((P_i - tau T(P')_i) / eps) - 1| / sum(w)``
        (for balanced problems: the L1 marginal violation of each part's plan, relative
        to its mass) is ``<= tol`` in every part of a divergence problem."""
        step = self._step(eps)
        # OT(α, β): alternating updates f_ba <- T(g_ab), then g_ab <- T(f_ba) (Sinkhorn's,
        # much faster than averaging them); OT(α, α), OT(β, β): the averaged update, whose
        # plain form would oscillate.
        batch = self.batch
        cross = slice(batch, 2 * batch)
        g_step = self._step(eps[cross], cross)
        tau = damping(eps[cross], self.rho)
        averaged = (torch.arange(len(state), device=state.device) >= 2 * batch).unsqueeze(-1)
        weights = self.stack.row_weights.double()
        mass = weights.sum(-1)
        active = torch.ones(self.batch, dtype=torch.bool, device=state.device)
        n_iter = torch.zeros(self.batch, dtype=torch.int64, device=state.device)
        err = torch.full((self.batch,), float("nan"), dtype=torch.float64, device=state.device)
        for t in range(max_iter + 1):
            target = self.update(state, eps, step)
            ratio = torch.expm1((state.double() - target.double()) / eps.double())
            residual = torch.where(weights > 0, weights * ratio.abs(), 0).sum(-1) / mass
            residual = residual.view(self.stack.parts, self.batch).amax(0)  # (B,)
            if not bool(torch.isfinite(residual[active]).all()):
                raise FloatingPointError(
                    "sinkhorn_divergence: a potential became non-finite in the converged "
                    "mode; check the inputs for inf/NaN"
                )
            err = torch.where(active, residual, err)
            active = active & ~(residual <= tol)
            if t == max_iter or not bool(active.any()):
                break
            keep = active.repeat(self.stack.parts).unsqueeze(-1)
            new = torch.where(averaged, 0.5 * (state + target), target)
            new[cross] = tau * g_step(new[:batch], new[cross] / tau)
            state = torch.where(keep, new, state)
            n_iter += active
        if bool(active.any()):
            bad = active.nonzero().flatten().tolist()
            warnings.warn(
                f"sinkhorn_divergence(mode='converged') did not reach tol={tol:g} within "
                f"max_iter={max_iter} updates in {len(bad)} of {self.batch} problem(s) "
                f"(e.g. problem {bad[0]}, residual {float(err[bad[0]]):.3g}); raise max_iter "
                "or blur",
                SinkhornConvergenceWarning,
                stacklevel=4,
            )
        return state, LoopInfo(n_iter, err)

    def extrapolate(self, state, eps, rows=None, cost=None) -> torch.Tensor:
        """The last update ``tau T(P')`` at ``eps (P B, 1)`` with detached inputs, under
        autograd: differentiable w.r.t. the stacked ``rows`` points (point clouds) or the
        stacked ``cost`` (given costs)."""
        h = (self.log_cols + _swap_halves(state, self.batch) / eps).detach()
        tau = damping(eps, self.rho)
        if cost is not None:
            soft = -eps * torch.logsumexp(h.unsqueeze(1) - cost / eps.unsqueeze(-1), dim=2)
        else:
            soft = point_softmin(
                rows,
                self.stack.cols,
                h,
                eps,
                cost=self.cost,
                scale=self.scale,
                block_elements=self.block_elements,
                guess=state / tau,
                native_lengths=self.row_lengths,
            )
        return tau * soft


def kept_lengths(weights: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64: the number of points of each row of ``weights (B, K)`` up to its
    last positive one (trailing zeros are padding).

    Example:
        >>> import torch
        >>> kept_lengths(torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])).tolist()
        [3, 0]
    """
    positive = weights > 0
    last = positive.flip(-1).to(torch.int8).argmax(-1)  # zeros after the last positive
    return torch.where(positive.any(-1), weights.shape[-1] - last, 0).to(torch.int64)


def stacked_rows(x: torch.Tensor, y: torch.Tensor, parts: int) -> torch.Tensor:
    """The differentiable stacked row points ``(P B, K, D)`` of centred ``x``, ``y``."""
    size = max(x.shape[1], y.shape[1])
    X, Y = _pad(x, size), _pad(y, size)
    return torch.cat([X, Y, X, Y][:parts])


def divergence_value(parts, a, b, eps: float, rho: float | None, debias: bool):
    """GeomLoss's ``sinkhorn_cost`` from the potentials ``(P B, K)`` of the last update.

    Balanced: ``<a, f_ba - f_aa> + <b, g_ab - g_bb>`` (``<a, f_ba> + <b, g_ab>`` without
    debiasing). Unbalanced (Séjourné et al. 2019, Prop. 12): ``(rho + eps / 2) (<a,
    exp(-f_aa / rho) - exp(-f_ba / rho)> + <b, exp(-g_bb / rho) - exp(-g_ab / rho)>)``,
    which includes the mass term ``eps / 2 (m(a) - m(b))^2``; without debiasing the self
    terms are replaced by 1. Its gradients use ``rho + eps`` instead of ``rho + eps / 2``
    (the first variation of the unbalanced cost, same proposition; less ``eps / 2`` per
    weight without debiasing, the derivative of the mass term those 1s carry); GeomLoss
    states this but its autograd applies ``rho + eps / 2`` to both.
    """
    batch, n, m = a.shape[0], a.shape[1], b.shape[1]
    f_ba, g_ab = parts[:batch, :n], parts[batch : 2 * batch, :m]
    if debias:
        f_aa, g_bb = parts[2 * batch : 3 * batch, :n], parts[3 * batch :, :m]
    if rho is None:
        if debias:
            return (a * (f_ba - f_aa)).sum(-1) + (b * (g_ab - g_bb)).sum(-1)
        return (a * f_ba).sum(-1) + (b * g_ab).sum(-1)

    def kept(f):  # exp(-f / rho), 1 for the missing self terms
        return 1.0 if f is None else torch.exp(-f / rho)

    self_a, self_b = (f_aa, g_bb) if debias else (None, None)
    terms = (a * (kept(self_a) - kept(f_ba))).sum(-1) + (b * (kept(self_b) - kept(g_ab))).sum(-1)
    forward, backward = rho + eps / 2, rho + eps
    value = forward * terms.detach() + backward * (terms - terms.detach())
    if not debias:
        # The 1s standing for the self terms are the mass term eps (m(a) + m(b)) / 2 of
        # the raw cost, whose derivative is eps / 2, not rho + eps (checked against
        # finite differences).
        mass = a.sum(-1) + b.sum(-1)
        value = value - 0.5 * eps * (mass - mass.detach())
    return value
