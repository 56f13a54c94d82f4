"""Collective validation of a sharded problem: every rank returns, or every rank raises.

Each rank checks its own inputs with the single-process checks
(:mod:`sinkhorn_ot._validation`), then ONE exchange of the outcomes and of a small
description of each rank's problem (sizes, masses, fingerprints of the replicated
tensors, the settings) lets every rank raise the same error, naming the rank, or build
the same problem. No collective runs before it, so a bad input on one rank cannot
leave the others waiting in a collective of the loop.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import _unbalanced as ub
from . import _validation as v
from ._collectives import Ranks, SumGradients, SumOverRanks
from .geometry import DenseCost, Geometry, PointCloud, as_geometry

#: Arguments that must be the same on every rank (else the ranks' loops would diverge).
_SHARED_SETTINGS = (
    "method", "grad", "max_iter", "tol", "eps_scaling", "eps_stage_iters", "backend", "shard_y",
    "stop"
)  # fmt: skip


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
    offset: torch.Tensor | None = None  # (B,) taken off a dense cost before solving
    rho: torch.Tensor | None = None  # (B, 2) relaxation (rho_a, rho_b), inf = hard


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
    rho = ub.relaxation(
        ub.check_rho("rho_a", settings["rho_a"], batch, batched, ref),
        ub.check_rho("rho_b", settings["rho_b"], batch, batched, ref),
        batch,
        dtype,
        ref.device,
    )
    if rho is not None and settings["shard_y"]:
        raise NotImplementedError(
            "`rho_a`/`rho_b` (relaxed marginals) are not supported with shard_y=True yet; "
            "replicate y (shard_y=False) for an unbalanced sharded solve"
        )
    if isinstance(geometry, DenseCost):
        geometry = DenseCost(dense)
        geometry.batched = batched  # (the stored cost is batched; the outputs follow the input)
    else:
        geometry = geometry.with_points(geometry.x.to(dtype), geometry.y.to(dtype))
    return geometry, a_b, b_b, eps_b, warm, dtype, rho


def _fingerprint(t: torch.Tensor | None) -> tuple | None:
    """Shape and two float64 sums of a tensor: equal on every rank if it is replicated."""
    if t is None:
        return None
    values = t.detach().double()
    return (tuple(t.shape), float(values.sum()), float((values * values).sum()))


def _requires_grad(geometry, a, b, eps, rho) -> tuple[bool, ...]:
    tensors = [geometry.C] if isinstance(geometry, DenseCost) else [geometry.x, geometry.y]
    return tuple(t is not None and t.requires_grad for t in (*tensors, a, b, eps, rho))


def _describe(geometry, a, b, eps, warm, rho, settings) -> dict:
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
        "which inputs require grad": _requires_grad(geometry, a, b, eps, rho),
        "`rho_a`, `rho_b`": None if rho is None else tuple(map(tuple, rho.detach().tolist())),
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
        expected = TypeError | ValueError | NotImplementedError
        kind = type(first) if isinstance(first, expected) else RuntimeError
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
        report = _describe(*pieces[:5], pieces[6], settings)
    except Exception as caught:  # every rank must hear of it, whatever it is
        error = caught
    reports = _raise_collectively(ranks, error, report)
    _agree(reports)
    return _assemble(pieces, reports, ranks, settings)


def _assemble(pieces, reports, ranks: Ranks, settings) -> ShardedProblem:
    """Uniform weights, the mass check and the sharded geometry, from agreed reports."""
    geometry, a_b, b_b, eps_b, warm, dtype, rho = pieces
    batch = geometry.shape[0]
    # Equal masses are a constraint of balanced problems only (as in one process).
    relaxed = ub.relaxed_problems(rho, batch, None).cpu() if rho is not None else None
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
        v.check_masses(*as_weights, relaxed=relaxed)

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
    ratio = (mass_a / col_total(b_b.sum(-1, dtype=torch.float64))).to(dtype)
    if relaxed is not None:  # relaxed problems keep their own masses (match_masses)
        ratio = torch.where(relaxed.to(ratio.device), 1, ratio)
    b_b = b_b * ratio.unsqueeze(-1)
    mass = mass_a.detach()
    offset = None
    if isinstance(geometry, DenseCost):
        # As sinkhorn(): solve on C - c where an offset dominates the spread (float32
        # potentials keep their digits), and padded entries get exactly zero gradient.
        from .solver import _mask_padding_gradient

        offset = _cost_offset(geometry.C, a_b, b_b, ranks, rho)
        solved = geometry.C if offset is None else geometry.C - offset.view(-1, 1, 1)
        geometry = DenseCost(_mask_padding_gradient(solved, a_b, b_b))
        if warm is not None and offset is not None:  # the warm start, in the shifted frame
            warm = warm.to(dtype) - offset.unsqueeze(-1) / 2
    from .distributed import RingShards, RowShards

    sharded = RingShards(geometry, ranks, sizes) if shard_y else RowShards(geometry, ranks)
    f0 = warm.to(dtype) if warm is not None else None
    batched = reports[0]["replicated"]["batched"]
    mass = mass.to(device)
    return ShardedProblem(sharded, a_b, b_b, eps_b, f0, mass, batched, offset, rho)


def _cost_offset(C, a, b, ranks: Ranks, rho=None) -> torch.Tensor | None:
    """:func:`sinkhorn_ot._validation.cost_offset` over every rank's rows (one all-reduce).

    Not for relaxed problems (``rho``): a shift of ``C`` changes how much they transport.
    """
    real = (a > 0).unsqueeze(2) & (b > 0).unsqueeze(1)
    values = C.detach()
    high = torch.where(real, values, float("-inf")).amax(dim=(1, 2))
    low = torch.where(real, values, float("inf")).amin(dim=(1, 2))
    high, negative_low = ranks.maximum(torch.stack([high, -low]))
    low = -negative_low
    centre = (high + low) / 2
    shift = (centre.abs() > (high - low)) & ~ub.relaxed_problems(rho, C.shape[0], C.device)
    if not bool(shift.any()):
        return None
    return torch.where(shift, centre, 0)
