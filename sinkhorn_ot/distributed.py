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

from . import _validation as v
from ._collectives import Ranks, SumGradients, SumOverRanks
from ._loop import eps_table
from ._updates import row_violation, safe_log
from .autograd import envelope_value
from .errors import raise_non_finite
from .geometry import BlockLogStep, DenseCost, Geometry, PointCloud, as_geometry
from .plan import LazyPlan
from .result import SinkhornResult

#: Arguments that must be the same on every rank (else the ranks' loops would diverge).
_SHARED_SETTINGS = ("method", "grad", "max_iter", "tol", "eps_scaling", "backend", "shard_y")


# ---------------------------------------------------------------------- geometries
class RowShardStep:
    """Log-domain half-steps of a problem whose rows are sharded over ``ranks``.

    ``row(g)`` is the local step's (each rank's rows see all of ``g``); ``col(f)``
    combines the ranks' partial log-sum-exps :meth:`~sinkhorn_ot._updates.LogStep.col_lse`.

    Unbalanced problems (relaxed marginals) change only the finishing map applied to
    the combined log-sum-exp (here ``-eps * lse``) and the violation, not the reduction:
    they slot in by taking that map from the local step.
    """

    def __init__(self, local_step, ranks: Ranks, eps: torch.Tensor):
        self.local, self.ranks, self.eps = local_step, ranks, eps

    def row(self, g: torch.Tensor) -> torch.Tensor:
        return self.local.row(g)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        return -self.eps * self.ranks.logsumexp(self.local.col_lse(f))

    def col_and_total(self, f, g_previous, extra):
        """``(col(f), sum over ranks of extra)`` in one all-reduce where it is safe.

        The partial sums are taken relative to ``-g_previous / eps`` (replicated), see
        :meth:`~sinkhorn_ot._collectives.Ranks.shifted_logsumexp`; where that frame
        would lose digits the stable two-pass combine is used (one more all-reduce).
        """
        lse = self.local.col_lse(f)
        combined, extra_total = self.ranks.shifted_logsumexp(lse, -g_previous / self.eps, extra)
        if combined is None:
            combined = self.ranks.logsumexp(lse)
        return -self.eps * combined, extra_total


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

    def log_step(self, log_a, log_b, eps):
        return RowShardStep(self.local.log_step(log_a, log_b, eps), self.ranks, eps)

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

    def log_step(self, log_a, log_b, eps):
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
def solve_sharded(geometry, a, b, f0, table, *, max_iter: int, tol: float | None, mass):
    """The loop of :func:`sinkhorn_ot._loop.solve` on a sharded geometry (log domain).

    Same iterates, stopping decisions and iteration counts as the single-process loop
    on the whole problem: the violation is the sum over ranks of each rank's rows'
    share (:func:`~sinkhorn_ot._updates.row_violation` with the total ``mass``), and it
    travels in the column update's all-reduce. A problem that stops discards the column
    update computed with it, exactly as the single-process loop never computes it.

    Args:
        geometry: :class:`RowShards` or :class:`RingShards`.
        a: local row weights ``(B, N_r)``; b: ``(B, M)`` (or local ``(B, M_r)``).
        f0: ``(B, N_r)``; table: ``(B, S)`` (:func:`sinkhorn_ot._loop.eps_table`).
        mass: ``(B,)`` float64 total mass over all ranks.

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

    step = geometry.log_step(log_a, log_b, eps_at(0))
    f = f0
    g = step.col(f)  # no previous g to shift by: the two-pass combine
    n_iter = torch.zeros(batch, dtype=torch.int64, device=device)
    err = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for t in range(max_iter + 1):
        if 0 < t <= last_column:
            step = geometry.log_step(log_a, log_b, eps_at(t))
        f_next = step.row(g)
        last = t == max_iter
        share = row_violation(f, f_next, a, eps_at(t), mass)  # this rank's rows
        if last:
            violation = ranks.total(share)
        else:  # the column update of every still-active problem, with the violation
            candidate = torch.where(active.unsqueeze(-1), f_next, f)
            g_next, violation = step.col_and_total(candidate, g, share)
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


# ---------------------------------------------------------------------- validation
@dataclasses.dataclass
class ShardedProblem:
    """A validated problem, this rank's share, batched, in the compute dtype."""

    geometry: Geometry  # RowShards or RingShards
    a: torch.Tensor  # (B, N_r)
    b: torch.Tensor  # (B, M) replicated, or (B, M_r) with shard_y
    eps: torch.Tensor  # (B,)
    f0: torch.Tensor | None  # warm start (B, N_r)
    mass: torch.Tensor  # (B,) float64, over all ranks
    batched: bool


def _local_checks(C, a, b, eps, init, settings):
    """Every check of one rank's inputs that needs no other rank; returns the pieces."""
    if settings["method"] == "kernel":
        raise ValueError(
            "`method` must be 'log' or 'auto' with `group` (the sharded solve runs in the "
            "log domain), got 'kernel'"
        )
    if settings["backend"] == "native":
        raise ValueError(
            "`backend` must be 'auto' or 'torch' with `group` (the sharded loop is the "
            "torch one), got 'native'"
        )
    if settings["grad"] == "unroll":
        raise ValueError(
            "`grad='unroll'` is not supported with `group`; use grad='implicit', "
            "'envelope' or 'none'"
        )
    geometry = as_geometry(C)
    if not isinstance(geometry, DenseCost | PointCloud):
        raise TypeError(f"`C` must be a DenseCost or a PointCloud, got {type(C).__name__}")
    if settings["shard_y"] and not isinstance(geometry, PointCloud):
        raise TypeError(
            "`shard_y=True` needs a PointCloud(x_local, y_local); a dense cost is sharded "
            "by rows only (pass the row block C_local (B, N_r, M))"
        )
    checks = v.ValueChecks()
    if isinstance(geometry, DenseCost):
        ref = v.check_cost(geometry.C, checks)
    else:
        ref = v._check_points(geometry, checks)
    batched = geometry.batched
    batch, n, m = geometry.shape
    a_b = v.check_weights("a", a, (batch, n), ref, batched, checks, positive_mass=False)
    sharded_b = settings["shard_y"]
    b_b = v.check_weights("b", b, (batch, m), ref, batched, checks, positive_mass=not sharded_b)
    dtype = v.compute_dtype(ref.dtype)
    dense = geometry.C.to(dtype) if isinstance(geometry, DenseCost) else None
    if dense is not None and not batched:
        dense = dense.unsqueeze(0)
    eps_b = v.check_eps_in_dtype(
        v.check_eps(eps, batch, batched, ref, checks), dense, dtype, checks
    )
    checks.run()
    warm = v.check_init(init, batch, n, m, batched, ref)
    if isinstance(geometry, DenseCost):
        geometry = DenseCost(dense)
        geometry.batched = batched  # (the stored cost is batched; the outputs follow the input)
    else:
        geometry = geometry.with_points(geometry.x.to(dtype), geometry.y.to(dtype))
    return geometry, a_b, b_b, eps_b, warm, dtype


def _fingerprint(t: torch.Tensor | None) -> tuple | None:
    """Shape and two float64 sums of a tensor: equal on every rank if it is replicated."""
    if t is None:
        return None
    values = t.detach().double()
    return (tuple(t.shape), float(values.sum()), float((values * values).sum()))


def _requires_grad(geometry, a, b, eps) -> tuple[bool, ...]:
    tensors = [geometry.C] if isinstance(geometry, DenseCost) else [geometry.x, geometry.y]
    return tuple(t is not None and t.requires_grad for t in (*tensors, a, b, eps))


def _describe(geometry, a, b, eps, warm, settings) -> dict:
    """What the other ranks must agree with (and this rank's sizes and masses)."""
    batch, n, m = geometry.shape
    point_cloud = isinstance(geometry, PointCloud)
    shard_y = settings["shard_y"]
    replicated = {
        "kind": type(geometry).__name__,
        "batched": geometry.batched,
        "batch size B": batch,
        "dtype": geometry.dtype,
        "device type": geometry.device.type,
        "eps": tuple(eps.detach().double().tolist()),
        "whether `a` is given": a is not None,
        "whether `b` is given": b is not None,
        "whether `init` is given": warm is not None,
        "which inputs require grad": _requires_grad(geometry, a, b, eps),
        **{f"`{name}`": settings[name] for name in _SHARED_SETTINGS},
    }
    if point_cloud:
        replicated["point dimension D"] = geometry.x.shape[-1]
        replicated["cost"] = (geometry.cost, geometry.cost_scale)
    if not shard_y:
        replicated["M (columns)"] = m
        replicated["`b`"] = _fingerprint(b)
        if point_cloud:
            replicated["`y`"] = _fingerprint(geometry.y)
    masses = {
        "a": None if a is None else a.sum(-1, dtype=torch.float64).tolist(),
        "b": None if b is None else b.sum(-1, dtype=torch.float64).tolist(),
    }
    return {"replicated": replicated, "sizes": (n, m), "masses": masses}


def _agree(reports: list[dict]) -> None:
    """Raise, on every rank alike, if the ranks were not given one consistent problem."""
    first = reports[0]["replicated"]
    for rank, report in enumerate(reports[1:], start=1):
        for key, value in first.items():
            if report["replicated"][key] != value:
                raise ValueError(
                    f"sinkhorn(group=...): {key} must be the same on every rank (replicated), "
                    f"got {value!r} on rank 0 and {report['replicated'][key]!r} on rank {rank}"
                )


def _raise_collectively(ranks: Ranks, error: BaseException | None, report: dict | None):
    """Exchange every rank's outcome (one collective); every rank raises the same error."""
    outcomes = ranks.exchange((error, report))
    failed = [(rank, e) for rank, (e, _) in enumerate(outcomes) if e is not None]
    if failed:
        rank, first = failed[0]
        kind = type(first) if isinstance(first, TypeError | ValueError) else RuntimeError
        raise kind(f"sinkhorn(group=...) on rank {rank} of {ranks.size}: {first}") from (
            error if error is first else None
        )
    return [report for _, report in outcomes]


def validate(C, a, b, eps, init, group, settings) -> ShardedProblem:
    """Check every rank's inputs together: every rank returns, or every rank raises.

    Each rank runs its local checks (catching its error), then ONE exchange of the
    outcomes and of a small description (sizes, masses, fingerprints of the replicated
    tensors, the settings) lets every rank raise the same error, naming the rank, or
    go on with a problem all ranks agree on. No collective runs before it, so a bad
    input on one rank cannot leave the others waiting in the loop.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sinkhorn(group=...) needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first, e.g. under torchrun)"
        )
    ranks = Ranks(group)
    error, report, pieces = None, None, None
    try:
        pieces = _local_checks(C, a, b, eps, init, settings)
        report = _describe(*pieces[:5], settings)
    except Exception as caught:  # every rank must hear of it, whatever it is
        error = caught
    reports = _raise_collectively(ranks, error, report)
    _agree(reports)
    return _assemble(pieces, reports, ranks, settings)


def _assemble(pieces, reports, ranks: Ranks, settings) -> ShardedProblem:
    """Uniform weights, the mass check and the sharded geometry, from agreed reports."""
    geometry, a_b, b_b, eps_b, warm, dtype = pieces
    batch = geometry.shape[0]
    sizes = [report["sizes"] for report in reports]
    shard_y = settings["shard_y"]
    n_total = sum(n for n, _ in sizes)
    m_total = sum(m for _, m in sizes) if shard_y else sizes[0][1]
    device = geometry.device

    def summed(side: str) -> torch.Tensor | None:
        per_rank = [report["masses"][side] for report in reports]
        if per_rank[0] is None:
            return None
        if side == "b" and not shard_y:
            return torch.tensor(per_rank[0], dtype=torch.float64)
        return torch.tensor(per_rank, dtype=torch.float64).sum(0)

    mass_a, mass_b = summed("a"), summed("b")
    for name, mass in (("a", mass_a), ("b", mass_b)):
        if mass is not None and bool((mass == 0).any()):
            problems = (mass == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"`{name}` must have positive total mass (summed over ranks) in every "
                f"problem, got all-zero weights in problem(s) {problems[:10]}"
            )
    if mass_a is not None and mass_b is not None:
        as_weights = (mass_a.unsqueeze(-1).to(a_b.dtype), mass_b.unsqueeze(-1).to(b_b.dtype))
        v.check_masses(*as_weights)

    # As solver's check_problem, with the sums over rows taken over ranks (differentiably:
    # b is rescaled to the mass of a, so a's gradient also flows through b).
    def row_total(t):
        return SumOverRanks.apply(t, ranks)

    col_total = row_total if shard_y else (lambda t: t)
    a_b = torch.where(a_b > 0, a_b, 0).to(dtype) if a_b is not None else None
    b_b = torch.where(b_b > 0, b_b, 0).to(dtype) if b_b is not None else None
    if a_b is not None:
        mass = row_total(a_b.sum(-1, keepdim=True))
    elif b_b is not None:
        mass = col_total(b_b.sum(-1, keepdim=True))
    else:
        mass = torch.ones(batch, 1, dtype=dtype, device=device)
    if a_b is None:  # uniform rows from the (replicated) mass of b
        a_b = (SumGradients.apply(mass, ranks) / n_total).expand(batch, geometry.shape[1])
    b_b = b_b if b_b is not None else (mass / m_total).expand(batch, geometry.shape[2])
    mass_a = row_total(a_b.sum(-1, dtype=torch.float64))
    b_b = b_b * (mass_a / col_total(b_b.sum(-1, dtype=torch.float64))).to(dtype).unsqueeze(-1)
    mass = mass_a.detach()
    if isinstance(geometry, DenseCost):  # padded entries get exactly zero gradient
        from .solver import _mask_padding_gradient

        geometry = DenseCost(_mask_padding_gradient(geometry.C, a_b, b_b))
    sharded = RingShards(geometry, ranks, sizes) if shard_y else RowShards(geometry, ranks)
    f0 = warm.to(dtype) if warm is not None else None
    batched = reports[0]["replicated"]["batched"]
    return ShardedProblem(sharded, a_b, b_b, eps_b, f0, mass.to(device), batched)


# ---------------------------------------------------------------------- the call
def sharded_sinkhorn(
    C, a, b, *, eps, group, method, max_iter, tol, grad, init, eps_scaling, backend, shard_y
) -> SinkhornResult:
    """:func:`sinkhorn_ot.sinkhorn` with ``group`` (or ``shard_y``): see the module doc."""
    from .solver import (
        _build_result,
        _default_init,
        _unbatch,
        complete_potentials,
        plan_violation,
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
        "tol": v.check_tol(tol),
        "eps_scaling": v.check_eps_scaling(eps_scaling),
        "shard_y": bool(shard_y),
    }
    problem = validate(C, a, b, eps, init, group, settings)
    geometry, ab, bb, eps_b = problem.geometry, problem.a, problem.b, problem.eps
    _refuse_unsupported_gradients(geometry, ab, bb, eps_b, settings)
    f0 = problem.f0 if problem.f0 is not None else _default_init(ab, eps_b)
    scale = geometry.scale() if settings["eps_scaling"] is not None else eps_b
    table = eps_table(eps_b, scale, settings["eps_scaling"])
    max_iter, tol = settings["max_iter"], settings["tol"]
    with torch.no_grad():
        f, g, n_iter, err = solve_sharded(
            geometry, ab, bb, f0, table, max_iter=max_iter, tol=tol, mass=problem.mass
        )
        padded = geometry.ranks.maximum((ab == 0).any().to(torch.int32).reshape(1))
        f, g = complete_potentials(geometry, ab, bb, f, g, table, max_iter, bool(padded[0]))
    if isinstance(geometry, RingShards):
        result = _ring_result(geometry, ab, bb, eps_b, f, g, n_iter, err, tol)
    else:
        result = _row_result(
            geometry, ab, bb, eps_b, f, g, n_iter, err, tol, settings["grad"],
            _build_result, plan_violation,
        )  # fmt: skip
    warn_unconverged(result, tol, max_iter, stacklevel=4)
    return result if problem.batched else _unbatch(result)


def _refuse_unsupported_gradients(geometry, a, b, eps, settings) -> None:
    """Clear errors (the same on every rank) for gradients that are not implemented."""
    local = geometry.local
    tensors = [local.C] if isinstance(local, DenseCost) else [local.x, local.y]
    wants = any(t.requires_grad for t in (*tensors, a, b, eps))
    if wants and isinstance(geometry, RingShards) and settings["grad"] != "none":
        raise NotImplementedError(
            "gradients of a solve with shard_y=True are not implemented yet; use "
            "grad='none', or replicate y (shard_y=False) for grad='envelope'/'implicit'"
        )


def _row_result(geometry, a, b, eps, f, g, n_iter, err, tol, grad, build, violation_of):
    """The single-process result building (``solver._build_result``) with row sums
    over ranks; ``plan`` is this rank's row block (dense or lazy)."""
    ranks, local = geometry.ranks, geometry.local
    shards = RowReductions(ranks)
    with torch.no_grad():
        plan = _local_plan(local, a, b, eps, f, g)
        err = violation_of(plan, a, b, row_total=shards.total)
    if grad == "implicit":
        from ._sharded_autograd import sharded_implicit_potentials

        f, g = sharded_implicit_potentials(local, ranks, a, b, eps, f, g)
    parts = (local, a, b, eps, f, g, n_iter, err, tol, "log", "torch")
    if grad in ("envelope", "none"):
        with torch.no_grad():
            result = build(*parts, shards=shards)
    else:
        result = build(*parts, shards=shards)
    if grad == "envelope":
        if isinstance(local, PointCloud):  # y's gradient: the sum of every rank's rows
            local = local.with_points(local.x, SumGradients.apply(local.y, ranks))
        value = envelope_value(
            local, a, b, eps, result.f, result.g, result.plan, result.value, result.value_linear
        )
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
    converged = certified <= (tol if tol is not None else _DEFAULT_TOL)
    return SinkhornResult(None, f, g, value, linear, n_iter, certified, converged, "log", "torch")


__all__ = [
    "RingShards",
    "RowShards",
    "sharded_sinkhorn",
    "solve_sharded",
    "sum_over_ranks",
    "validate",
]
