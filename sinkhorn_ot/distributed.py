"""Sinkhorn on problems sharded over the processes of a ``torch.distributed`` group.

``sinkhorn(geometry_local, a_local, b, eps=..., group=group)`` (docs/distributed.md):

* **rows sharded** (default): each rank holds a contiguous slice of the rows, the
  points ``x_local (B, N_r, D)`` of a :class:`~sinkhorn_ot.PointCloud` or the row block
  ``C_local (B, N_r, M)`` of a :class:`~sinkhorn_ot.DenseCost`, with their weights
  ``a_local (B, N_r)``; ``y``/``b`` are replicated. The row update is local; the column
  update combines the ranks' partial log-sum-exps in ONE all-reduce that also carries
  the stopping test's violation (:meth:`RowShardStep.col_and_total`).
* **rows and columns sharded** (``shard_y=True``, point clouds): each rank holds
  ``x_local, a_local`` and ``y_local, b_local``; both updates visit the other ranks'
  blocks of points along a ring (:meth:`sinkhorn_ot._collectives.Ranks.ring`), so no
  rank ever holds more than two blocks of either cloud.

Relaxed marginals (``rho_a``, ``rho_b``, rows sharded only) damp the combined
half-steps and stop on the potentials change, a maximum over ranks (one more all-reduce
per iteration, :func:`solve_sharded`).

Nothing gathers the cost, the plan or the points. The stopping rule, the eps table, the
padded-row completion and the result are the single-process ones (``_loop``,
``solver``), fed with sums over ranks.

Example:
    >>> import torch
    >>> from sinkhorn_ot import PointCloud, sinkhorn
    >>> sinkhorn(PointCloud(torch.randn(5, 2), torch.randn(4, 2)), eps=1.0,
    ...          shard_y=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `shard_y=True` needs `group` (a torch.distributed process group...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist

from . import _unbalanced as ub
from . import _validation as v
from ._collectives import Ranks, SumGradients, SumOverRanks
from ._loop import eps_table
from ._sharded_validation import validate
from ._tolerance import is_auto, resolve
from ._unbalanced import damping, potential_change
from ._updates import damped, row_violation, safe_log
from .autograd import envelope_value
from .errors import raise_non_finite
from .geometry import BlockLogStep, DenseCost, Geometry, PointCloud
from .plan import LazyPlan
from .result import SinkhornResult


# ---------------------------------------------------------------------- geometries
class RowShardStep:
    """Log-domain half-steps of a problem whose rows are sharded over ``ranks``.

    ``row(g)`` is the local step's (each rank's rows see all of ``g``); ``col(f)``
    combines the ranks' partial log-sum-exps :meth:`~sinkhorn_ot._updates.LogStep.col_lse`.

    Unbalanced problems (relaxed marginals) change only the finishing map applied to
    the combined log-sum-exp, not the reduction: the damping ``tau_b`` multiplies
    ``-eps * lse`` after the all-reduce (:func:`~sinkhorn_ot._updates.damped`), while the
    row update, local, is damped by the local step itself.
    """

    def __init__(self, local_step, ranks: Ranks, eps: torch.Tensor, damping=None):
        self.local, self.ranks, self.eps, self.damping = local_step, ranks, eps, damping

    def row(self, g: torch.Tensor) -> torch.Tensor:
        return self.local.row(g)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        return damped(-self.eps * self.ranks.logsumexp(self.local.col_lse(f)), self.damping, 1)

    def col_and_total(self, f, g_previous, extra):
        """``(col(f), sum over ranks of extra)`` in one all-reduce where it is safe.

        The partial sums are taken relative to ``-g_previous / (eps tau_b)`` (replicated;
        the log-sum-exp that gave ``g_previous``), see
        :meth:`~sinkhorn_ot._collectives.Ranks.shifted_logsumexp`; where that frame
        would lose digits the stable two-pass combine is used (one more all-reduce).
        """
        lse = self.local.col_lse(f)
        frame = -damped(g_previous / self.eps, _undamping(self.damping), 1)
        combined, extra_total = self.ranks.shifted_logsumexp(lse, frame, extra)
        if combined is None:
            combined = self.ranks.logsumexp(lse)
        return damped(-self.eps * combined, self.damping, 1), extra_total


def _undamping(damping):
    """``(1 / tau_a, 1 / tau_b)``: undoes :func:`~sinkhorn_ot._updates.damped` (``tau > 0``)."""
    return None if damping is None else tuple(1 / tau for tau in damping)


class RowShards(Geometry):
    """One rank's rows of a problem sharded by rows: the local geometry and its group.

    ``shape`` is the local ``(B, N_r, M)``; the half-steps reduce over ranks
    (:class:`RowShardStep`), everything else (blocks, plan, gradients) is local.
    """

    def __init__(self, local: Geometry, ranks: Ranks):
        self.local, self.ranks = local, ranks
        self.batched, self.shape = local.batched, local.shape

    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)

    def log_step(self, log_a, log_b, eps, damping=None):
        local_step = self.local.log_step(log_a, log_b, eps, damping)
        return RowShardStep(local_step, self.ranks, eps, damping)

    def scale(self) -> torch.Tensor:
        return self.ranks.maximum(self.local.scale())

    def blocks(self) -> Iterator[tuple[int, int]]:
        return self.local.blocks()

    def cost_block(self, i0: int, i1: int) -> torch.Tensor:
        return self.local.cost_block(i0, i1)

    def select(self, index: torch.Tensor) -> RowShards:
        return RowShards(self.local.select(index), self.ranks)

    def detach(self) -> RowShards:
        return RowShards(self.local.detach(), self.ranks)


class RingStep:
    """Log-domain half-steps of a point cloud whose rows AND columns are sharded.

    ``row(g_local)`` needs every column: the blocks ``(y_s, log b_s, g_s)`` of all ranks
    pass by along a ring and each adds its log-sum-exp; ``col(f_local)`` likewise with
    the blocks ``(x_s, log a_s, f_s)``. Both are exact (``logaddexp`` of per-block
    log-sum-exps, as :class:`~sinkhorn_ot.geometry.BlockLogStep` combines row blocks).
    """

    def __init__(self, shards: RingShards, log_a, log_b, eps):
        self.shards, self.log_a, self.log_b, self.eps = shards, log_a, log_b, eps

    def _pack(self, points, log_w, potential):
        return torch.cat([points, log_w.unsqueeze(-1), potential.unsqueeze(-1)], -1)

    def row(self, g: torch.Tensor) -> torch.Tensor:
        s = self.shards
        total = None
        packed = self._pack(s.local.y, self.log_b, g)
        for _, block in s.ranks.ring(packed, s.packed_shapes("y")):
            y, log_b, g_s = block[..., :-2], block[..., -2], block[..., -1]
            part = BlockLogStep(s.pair(s.local.x, y), self.log_a, log_b, self.eps).row_lse(g_s)
            total = part if total is None else torch.logaddexp(total, part)
        return -self.eps * total

    def col(self, f: torch.Tensor) -> torch.Tensor:
        s = self.shards
        total = None
        packed = self._pack(s.local.x, self.log_a, f)
        for _, block in s.ranks.ring(packed, s.packed_shapes("x")):
            x, log_a, f_s = block[..., :-2], block[..., -2], block[..., -1]
            part = BlockLogStep(s.pair(x, s.local.y), log_a, self.log_b, self.eps).col_lse(f_s)
            total = part if total is None else torch.logaddexp(total, part)
        return -self.eps * total

    def col_and_total(self, f, g_previous, extra):
        return self.col(f), self.shards.ranks.total(extra)


class RingShards(Geometry):
    """One rank's ``x_local, y_local`` of a point cloud sharded on both sides.

    Args:
        local: ``PointCloud(x_local, y_local)``, batched.
        ranks: the group.
        sizes: ``(N_s, M_s)`` of every rank, in rank order.
    """

    def __init__(self, local: PointCloud, ranks: Ranks, sizes: list[tuple[int, int]]):
        self.local, self.ranks, self.sizes = local, ranks, sizes
        self.batched, self.shape = local.batched, local.shape

    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)

    def pair(self, x: torch.Tensor, y: torch.Tensor) -> PointCloud:
        """The cost between a block of rows and a block of columns (batched points)."""
        local = self.local
        return PointCloud(
            x, y, local.cost, scale=local.cost_scale, block_elements=local.block_elements
        )

    def packed_shapes(self, side: str) -> list[tuple[int, int, int]]:
        """Shapes of every rank's ring message ``(points, log weight, potential)``."""
        batch, dim = self.local.x.shape[0], self.local.x.shape[2]
        index = 0 if side == "x" else 1
        return [(batch, size[index], dim + 2) for size in self.sizes]

    def log_step(self, log_a, log_b, eps, damping=None):
        if damping is not None:  # refused by validation; a guard for direct callers
            raise NotImplementedError("relaxed marginals with shard_y=True")
        return RingStep(self, log_a, log_b, eps)

    def scale(self) -> torch.Tensor:
        top = None
        for _, y in self.ranks.ring(self.local.y, self.shapes_of("y")):
            part = self.pair(self.local.x, y).scale()
            top = part if top is None else torch.maximum(top, part)
        return self.ranks.maximum(top)

    def shapes_of(self, side: str) -> list[tuple[int, int, int]]:
        return [(*shape[:2], shape[2] - 2) for shape in self.packed_shapes(side)]

    def select(self, index: torch.Tensor) -> RingShards:
        return RingShards(self.local.select(index), self.ranks, self.sizes)

    def detach(self) -> RingShards:
        return RingShards(self.local.detach(), self.ranks, self.sizes)


# ---------------------------------------------------------------------- the loop
def solve_sharded(
    geometry, a, b, f0, table, *, max_iter: int, tol: float | None, mass, rho=None,
    potentials=None,
):  # fmt: skip
    """The loop of :func:`sinkhorn_ot._loop.solve` on a sharded geometry (log domain).

    Same iterates, stopping decisions and iteration counts as the single-process loop
    on the whole problem: the violation is the sum over ranks of each rank's rows'
    share (:func:`~sinkhorn_ot._updates.row_violation` with the total ``mass``), and it
    travels in the column update's all-reduce. A problem that stops discards the column
    update computed with it, exactly as the single-process loop never computes it.

    Problems on the potentials rule (``potentials``, e.g. relaxed ones) stop on the
    sup-norm change of ``f`` (:func:`~sinkhorn_ot._unbalanced.potential_change`), a
    maximum over ranks: one more all-reduce (MAX, ``B`` numbers) per iteration, since
    the column update's buffer is summed. Balanced-only batches on the marginal rule
    do not pay it.

    Args:
        geometry: :class:`RowShards` or :class:`RingShards`.
        a: local row weights ``(B, N_r)``; b: ``(B, M)`` (or local ``(B, M_r)``).
        f0: ``(B, N_r)``; table: ``(B, S)`` (:func:`sinkhorn_ot._loop.eps_table`).
        mass: ``(B,)`` float64 total mass over all ranks.
        rho: ``(B, 2)`` relaxation or ``None``: the half-steps are damped.
        potentials: ``(B,)`` bool, problems on the potentials rule, or ``None``.

    Returns:
        ``f (B, N_r)``, ``g``, ``n_iter (B,)``, ``err (B,)``, identical decisions on
        every rank.
    """
    ranks = geometry.ranks
    batch = geometry.shape[0]
    device = f0.device
    log_a, log_b = safe_log(a), safe_log(b)
    last_column = table.shape[1] - 1

    def eps_at(t: int) -> torch.Tensor:
        return table[:, min(t, last_column)].unsqueeze(-1)

    def step_at(t: int):
        e = eps_at(t)
        return geometry.log_step(log_a, log_b, e, damping(rho, e))

    step = step_at(0)
    f = f0
    g = step.col(f)  # no previous g to shift by: the two-pass combine
    n_iter = torch.zeros(batch, dtype=torch.int64, device=device)
    err = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for t in range(max_iter + 1):
        if 0 < t <= last_column:
            step = step_at(t)
        f_next = step.row(g)
        last = t == max_iter
        share = row_violation(f, f_next, a, eps_at(t), mass)  # this rank's rows
        if last:
            violation = ranks.total(share)
        else:  # the column update of every still-active problem, with the violation
            candidate = torch.where(active.unsqueeze(-1), f_next, f)
            g_next, violation = step.col_and_total(candidate, g, share)
        if potentials is not None:  # a maximum over ranks: its own all-reduce
            change = ranks.maximum(potential_change(f, f_next, a, eps_at(t)))
            violation = torch.where(potentials, change, violation)
        if not bool(torch.isfinite(violation[active]).all()):
            raise_non_finite("log")
        err = torch.where(active, violation, err)
        if tol is not None and t >= last_column:
            active = active & ~(violation <= tol)
        if last or not bool(active.any()):
            break
        keep = active.unsqueeze(-1)
        f = torch.where(keep, f_next, f)
        g = torch.where(keep, g_next, g)
        n_iter += active
    finite = torch.isfinite(f).all() & torch.isfinite(g).all()
    if not bool(ranks.maximum((~finite).to(torch.int32).reshape(1))[0] == 0):
        raise_non_finite("log")
    return f, g, n_iter, err


def sum_over_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` summed over the ranks of ``group`` (default: the whole world), differentiably.

    The way to build the one loss every rank backpropagates from local results (this
    rank's ``f``, its rows of the plan): ``loss = sum_over_ranks(local_loss)``. Its
    gradient reaches each rank's own term unchanged (docs/distributed.md, "Gradients").

    Example:
        >>> import torch
        >>> from sinkhorn_ot.distributed import sum_over_ranks
        >>> sum_over_ranks(torch.ones(2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: sum_over_ranks needs an initialised torch.distributed process group...
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sum_over_ranks needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return SumOverRanks.apply(t, Ranks(dist.group.WORLD if group is None else group))


# ---------------------------------------------------------------------- the call
def sharded_sinkhorn(
    C, a, b, *, eps, group, method, max_iter, tol, grad, init, eps_scaling, backend, shard_y,
    rho_a=None, rho_b=None, stop=None, eps_stage_iters=1,
) -> SinkhornResult:  # fmt: skip
    """:func:`sinkhorn_ot.sinkhorn` with ``group`` (or ``shard_y``): see the module doc."""
    from .solver import (
        _build_result,
        _default_init,
        _stop_rule,
        _unbatch,
        complete_potentials,
        warn_unconverged,
    )

    if group is None:
        raise ValueError(
            "`shard_y=True` needs `group` (a torch.distributed process group, e.g. "
            "torch.distributed.group.WORLD), got group=None"
        )
    settings = {
        "method": v.check_choice("method", method, v.METHODS),
        "grad": v.check_choice("grad", grad, v.GRADS),
        "backend": v.check_choice("backend", backend, v.BACKENDS),
        "max_iter": v.check_int("max_iter", max_iter, 0),
        "tol": v.check_tol(tol, auto=True),
        "eps_scaling": v.check_eps_scaling(eps_scaling),
        "eps_stage_iters": v.check_int("eps_stage_iters", eps_stage_iters, 1),
        "shard_y": bool(shard_y),
        "stop": None if stop is None else v.check_choice("stop", stop, ub.STOP_RULES),
        "rho_a": rho_a,
        "rho_b": rho_b,
    }
    problem = validate(C, a, b, eps, init, group, settings)
    geometry, ab, bb, eps_b, rho = problem.geometry, problem.a, problem.b, problem.eps, problem.rho
    _refuse_unsupported_gradients(geometry, ab, bb, eps_b, rho, settings)
    potentials = _stop_rule(settings["stop"], rho, ab.shape[0], ab.device)
    f0 = problem.f0 if problem.f0 is not None else _default_init(ab, eps_b)
    scale = geometry.scale() if settings["eps_scaling"] is not None else eps_b
    table = eps_table(eps_b, scale, settings["eps_scaling"], settings["eps_stage_iters"])
    max_iter, tol = settings["max_iter"], settings["tol"]
    if is_auto(tol):  # the sharded max|C| (every rank the same), padding included
        tol = resolve(tol, geometry.dtype, geometry.scale(), eps_b)
    with torch.no_grad():
        f, g, n_iter, err = solve_sharded(
            geometry, ab, bb, f0, table, max_iter=max_iter, tol=tol, mass=problem.mass,
            rho=rho, potentials=potentials,
        )  # fmt: skip
        padded = geometry.ranks.maximum((ab == 0).any().to(torch.int32).reshape(1))
        f, g = complete_potentials(
            geometry, ab, bb, f, g, table, max_iter, rho, padded_rows=bool(padded[0])
        )
        # As in one process, the loop's potentials change certifies the returned (f, g)
        # unless an unfinished schedule recomputed g.
        change = None if table.shape[1] - 1 > max_iter else err
    if isinstance(geometry, RingShards):
        result = _ring_result(geometry, ab, bb, eps_b, f, g, n_iter, err, tol)
    else:
        rule = Rule(rho, potentials, change)
        result = _row_result(
            geometry, ab, bb, eps_b, f, g, n_iter, tol, settings["grad"], _build_result, rule
        )
    if problem.offset is not None:
        result = _shift_back(result, problem.offset, ab, RowReductions(geometry.ranks))
    warn_unconverged(result, tol, max_iter, stacklevel=4)
    return result if problem.batched else _unbatch(result)


def _shift_back(result: SinkhornResult, offset, a, shards) -> SinkhornResult:
    """``solver._shift_back`` with the sums over rows taken over ranks."""
    half = (offset / 2).unsqueeze(-1)
    mass = shards.total(a.sum(-1))
    plan_mass = shards.total(result.plan.sum(dim=(1, 2)))
    return dataclasses.replace(
        result,
        f=result.f + half,
        g=result.g + half,
        value=result.value + offset * mass,
        value_linear=result.value_linear + offset * plan_mass,
    )


def _refuse_unsupported_gradients(geometry, a, b, eps, rho, settings) -> None:
    """Clear errors (the same on every rank) for gradients that are not implemented.

    ``requires_grad`` of every input is agreed on by validation, so every rank decides
    alike.
    """
    local = geometry.local
    tensors = [local.C] if isinstance(local, DenseCost) else [local.x, local.y]
    wants = any(t is not None and t.requires_grad for t in (*tensors, a, b, eps, rho))
    if wants and isinstance(geometry, RingShards) and settings["grad"] != "none":
        raise NotImplementedError(
            "gradients of a solve with shard_y=True are not implemented yet; use "
            "grad='none', or replicate y (shard_y=False) for grad='envelope'/'implicit'"
        )
    if wants and rho is not None and settings["grad"] == "implicit":
        raise NotImplementedError(
            "grad='implicit' with `group` and `rho_a`/`rho_b` (relaxed marginals) is not "
            "implemented yet (the sharded conjugate gradients solve the balanced adjoint "
            "only); use grad='envelope' (gradients of `value`) or grad='none'"
        )


@dataclasses.dataclass
class Rule:
    """How a sharded result is certified: the relaxation and the stopping rule.

    ``rho (B, 2)`` or ``None``; ``potentials (B,)`` bool or ``None`` (problems on the
    potentials rule); ``change (B,)``: the loop's potential change of the returned
    ``(f, g)``, or ``None`` to measure it with one more (local) row update.
    """

    rho: torch.Tensor | None = None
    potentials: torch.Tensor | None = None
    change: torch.Tensor | None = None


def certified_error(geometry: RowShards, plan, a, b, eps, f, g, rule: Rule) -> torch.Tensor:
    """:func:`sinkhorn_ot.solver.certified_error` of one rank's rows, summed over ranks.

    The marginal rule: :func:`~sinkhorn_ot.solver.plan_violation` with row totals over
    ranks. The potentials rule: the larger of the potentials change (a maximum over
    ranks) and the violation of the hard marginals
    (:func:`~sinkhorn_ot._unbalanced.hard_violation` with row totals over ranks).
    """
    from .solver import _marginals64, plan_violation

    ranks = geometry.ranks
    if rule.potentials is None:
        return plan_violation(plan, a, b, row_total=ranks.total)
    with torch.no_grad():
        rows, cols = _marginals64(plan)
        balanced = torch.full_like(eps.unsqueeze(-1).expand(-1, 2), float("inf"))
        rho = balanced if rule.rho is None else rule.rho
        hard = ub.hard_violation(rows, cols, a, b, rho, row_total=ranks.total)
        change = rule.change
        if change is None:
            e = eps.unsqueeze(-1)
            step = geometry.log_step(safe_log(a), safe_log(b), e, damping(rule.rho, e))
            change = ranks.maximum(potential_change(f, step.row(g), a, e))
        return torch.where(rule.potentials, torch.maximum(change, hard), hard)


def _row_result(geometry, a, b, eps, f, g, n_iter, tol, grad, build, rule: Rule):
    """The single-process result building (``solver._build_result``) with row sums
    over ranks; ``plan`` is this rank's row block (dense or lazy)."""
    ranks, local = geometry.ranks, geometry.local
    shards = RowReductions(ranks)
    with torch.no_grad():
        plan = _local_plan(local, a, b, eps, f, g)
        err = certified_error(geometry, plan, a, b, eps, f, g, rule)
    rho = rule.rho
    if grad == "implicit" and rho is None:  # (relaxed: refused if any gradient is wanted)
        from ._sharded_autograd import sharded_implicit_potentials

        f, g = sharded_implicit_potentials(local, ranks, a, b, eps, f, g)
    parts = (local, a, b, eps, f, g, n_iter, err, tol, "log", "torch", rho)
    if grad in ("envelope", "none"):
        with torch.no_grad():
            result = build(*parts, shards=shards)
    else:
        result = build(*parts, shards=shards)
    if grad == "envelope":
        if isinstance(local, PointCloud):  # y's gradient: the sum of every rank's rows
            local = local.with_points(local.x, SumGradients.apply(local.y, ranks))
        value = envelope_value(
            local, a, b, eps, result.f, result.g, result.plan, result.value,
            result.value_linear, rho, row_total=ranks.total,
        )  # fmt: skip
        result = dataclasses.replace(result, value=value)
    return result


class RowReductions:
    """How a result of rows sharded over ``ranks`` is assembled, differentiably.

    ``total``: a sum over this rank's rows, summed over ranks (:class:`SumOverRanks`);
    ``local``: a replicated tensor (``g``, ``b``, ``eps``) entering this rank's rows, whose
    gradient from them is summed over ranks (:class:`SumGradients`).
    """

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return SumOverRanks.apply(t, self.ranks)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return SumGradients.apply(t, self.ranks) if t.requires_grad else t


def _local_plan(local, a, b, eps, f, g):
    """This rank's rows of the plan: dense for a row block of cost, else lazy."""
    from .solver import _plan_of

    return _plan_of(local, a, b, eps, f, g)


def _ring_result(geometry: RingShards, a, b, eps, f, g, n_iter, err, tol) -> SinkhornResult:
    """Result of a solve sharded on both sides, from two ring passes over the points.

    ``f`` is sharded like ``x``, ``g`` like ``y``; ``plan`` is ``None`` (its blocks are
    spread over every pair of ranks). ``err`` is the certified violation of the plan:
    the row sums and ``<C, P>`` come from the ``y`` blocks passing by, the column sums
    from the ``x`` blocks.
    """
    from .solver import _DEFAULT_TOL

    ranks, local = geometry.ranks, geometry.local
    rows = torch.zeros_like(f, dtype=torch.float64)
    cols = torch.zeros_like(g, dtype=torch.float64)
    linear = torch.zeros_like(eps, dtype=torch.float64)
    with torch.no_grad():
        packed = torch.cat([local.y, b.unsqueeze(-1), g.unsqueeze(-1)], -1)
        for _, block in ranks.ring(packed, geometry.packed_shapes("y")):
            y, b_s, g_s = block[..., :-2], block[..., -2], block[..., -1]
            plan = LazyPlan(geometry.pair(local.x, y), f, g_s, a, b_s, eps)
            block_rows, _ = plan.marginals(dtype=torch.float64)
            rows += block_rows
            linear += plan.linear_value().double()
        packed = torch.cat([local.x, a.unsqueeze(-1), f.unsqueeze(-1)], -1)
        for _, block in ranks.ring(packed, geometry.packed_shapes("x")):
            x, a_s, f_s = block[..., :-2], block[..., -2], block[..., -1]
            _, block_cols = LazyPlan(geometry.pair(x, local.y), f_s, g, a_s, b, eps).marginals(
                dtype=torch.float64
            )
            cols += block_cols
        a64, b64 = a.double(), b.double()
        sums = torch.stack(
            [
                (rows - a64).abs().sum(-1) + (cols - b64).abs().sum(-1),
                a64.sum(-1),
                (f * a).sum(-1).double(),
                (g * b).sum(-1).double(),
                linear,
            ]
        )
        gap, mass, fa, gb, linear = ranks.total(sums)
        certified = gap / mass
        shift = ((gb - fa) / (2 * mass)).to(f.dtype)
        f, g = f + shift.unsqueeze(-1), g - shift.unsqueeze(-1)
        value = (fa + gb).to(f.dtype)  # the shift cancels in <f, a> + <g, b>
        linear = linear.to(f.dtype)
    reference = tol if tol is not None else _DEFAULT_TOL
    converged = certified <= reference
    parts = (None, f, g, value, linear, n_iter, certified, converged, "log", "torch")
    return SinkhornResult(*parts, tol=reference)


__all__ = [
    "RingShards",
    "RowShards",
    "sharded_sinkhorn",
    "solve_sharded",
    "sum_over_ranks",
    "validate",
]
