"""Point-cloud problems and our point-cloud solvers for the benchmark suite (CPU).

The cost is never stored by the solvers timed here: ``C_ij = |x_i - y_j|^2`` between two
clouds of ``N = M`` uniform points in ``[0, 1]^D`` (float32, uniform weights, one problem:
``B = 1``), ``eps = 0.05 x median cost`` (median over the first 1000 x 1000 pairs), fixed
seeds. That is POT's ``metric="sqeuclidean"`` and OTT-JAX's ``PointCloud`` default cost;
GeomLoss's ``p=2`` cost is ``|x - y|^2 / 2``, so GeomLoss gets the points times ``sqrt(2)``
and ``blur = sqrt(eps)`` (``docs/geometry.md``).

**Per-iteration time.** Every implementation ``run(case, n)`` performs exactly ``n``
iterations (two half-steps each: an ``N x M`` soft-min over rows and one over columns)
plus whatever fixed work it does per call (building cost matrices, a final marginal or
value pass, compiling nothing: jitted functions are compiled in ``prepare``). We time
``n = T`` and ``n = T0`` interleaved (every implementation of the row, round after round,
on the same inputs), take the minimum of each over the rounds and report

    time per iteration = (t(T) - t(T0)) / (T - T0)

which removes the per-call work. ``T, T0`` and the number of rounds per size are in
:data:`PC_ITERS` (fewer iterations at the larger sizes to keep the section short).

**Our rows** time the loop that ``sinkhorn(PointCloud(x, y), backend=...)`` runs for that
backend: ``ops.solve_points`` (native) and ``_loop.solve`` on the ``PointCloud`` (torch),
and ``ops.solve_dense`` on the stored cost for the dense comparison. A ``sinkhorn()``
call adds the result (``value_linear`` and ``err`` through the lazy plan, on the torch
side), which costs a few iterations' worth per call; it is measured separately (the
"call overhead" column: ``t(sinkhorn(..., max_iter=T0)) - t(loop, T0)``), and the
agreement check runs the full ``sinkhorn()``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from sinkhorn_ot import PointCloud, ops, sinkhorn, sqeuclidean
from sinkhorn_ot._loop import solve as torch_loop_solve

#: Dimensions and sizes (``N = M``) of the timed grid.
PC_DIMS = (3, 64)
PC_SIZES = (1000, 10000, 50000)
#: ``(T, T0, rounds)`` per size: per-iteration time = (t(T) - t(T0)) / (T - T0), each the
#: minimum over ``rounds`` interleaved rounds. An implementation that cannot run ``T0``
#: iterations uses ``T0' = max(T0, min_iter)`` and ``T' = T0' + T - T0`` (GeomLoss: >= 3;
#: POT, OTT: >= 1; ours: 0, whose fixed cost is the final column update). At 1000,
#: T - T0 = 20 covers POT's every-10-iterations marginal check twice (its steady-state
#: rate); at the larger sizes POT's check never runs (slightly in POT's favour).
PC_ITERS = {1000: (21, 1, 2), 10000: (3, 1, 1), 50000: (1, 0, 1)}
#: Size of the agreement check (every implementation at convergence, before timing).
PC_AGREE_N = 500
#: Largest N of the dense comparison (the stored cost is 4 N^2 bytes: 400 MB at 10 000).
DENSE_MAX_N = 10000
#: At N = 50 000 an implementation is skipped when its estimated time there
#: (per-iteration time at the previous size scaled by N*M, times the iterations of all
#: rounds) exceeds this many seconds; the table says so, with the estimate. (Below 50 000
#: everything that fits runs: POT's per-iteration time at 1000 is mostly per-block
#: Python work, so the N*M scaling overestimates it at 10 000 by about 3x.)
ROW_BUDGET_S = 40.0
SKIP_ESTIMATE_FROM_N = 50000
#: Multiplier of the median cost that defines eps (as in ``cases.py``).
EPS_FACTOR = 0.05
#: Tolerance of the converged runs of the agreement check (relative L1 marginal error).
PC_AGREE_TOL = 1e-5
#: Limit of the agreement check: max |P - P_ours| / max P_ours (as ``agreement.PLAN_RTOL``).
PC_PLAN_RTOL = 1e-3


@dataclass
class PCCase:
    """One point-cloud problem, batched with ``B = 1``: ``x (1, N, D)``, ``y (1, M, D)``."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    eps: float
    dim: int

    @property
    def n(self) -> int:
        return self.x.shape[1]

    @property
    def m(self) -> int:
        return self.y.shape[1]

    @property
    def work(self) -> int:
        """``B * N * M``: pair evaluations of one half-step."""
        return self.x.shape[0] * self.n * self.m


def pc_name(dim: int, n: int) -> str:
    return f"D{dim}-N{n}"


_CASES: dict[tuple[int, int], PCCase] = {}


def pc_case(dim: int, n: int, seed: int = 0) -> PCCase:
    """The problem ``(D, N = M)``, built once per session from a fixed seed."""
    key = (dim, n)
    if key not in _CASES:
        g = torch.Generator().manual_seed(seed + 7919 * dim + n)
        x = torch.rand(1, n, dim, generator=g, dtype=torch.float64)
        y = torch.rand(1, n, dim, generator=g, dtype=torch.float64)
        k = min(n, 1000)
        eps = EPS_FACTOR * float(sqeuclidean(x[:, :k], y[:, :k]).median())
        a = torch.full((1, n), 1.0 / n, dtype=torch.float32)
        b = torch.full((1, n), 1.0 / n, dtype=torch.float32)
        if n >= 50000:
            _CASES.clear()  # keep at most one large case alive
        _CASES[key] = PCCase(pc_name(dim, n), x.float(), y.float(), a, b, eps, dim)
    return _CASES[key]


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(nbytes: float, fraction: float = 0.5) -> bool:
    avail = mem_available_bytes()
    return avail is None or nbytes <= fraction * avail


class PCImpl:
    """Interface of everything timed on point clouds.

    Attributes:
        key: unique id (``"ours-native"``, ``"pot-lazy"``, ...).
        label: column/row name in the report.
        ours: our own solver (ratios are peer / ``ours[native]``).
        min_iter: smallest ``n`` that ``run`` supports (GeomLoss's schedule has >= 2).
    """

    key = ""
    label = ""
    ours = False
    min_iter = 1
    #: largest N with an untimed warm-up run before the rounds (first-call effects:
    #: thread pools, fresh pages); peers whose every call costs seconds skip it
    warm_up_max_n = math.inf

    def unavailable(self, case: PCCase) -> str | None:
        """Why this implementation does not run on ``case`` (None: it runs)."""
        return None

    def prepare(self, case: PCCase, iters: tuple[int, ...]) -> None:
        """Untimed set-up for the given iteration counts (jit compilation, dense cost)."""

    def run(self, case: PCCase, n_iter: int):
        """Exactly ``n_iter`` iterations; returns once the result is computed."""
        raise NotImplementedError

    def converged(
        self, case: PCCase, tol: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f (N,), g (M,), plan (N, M))`` at convergence, in our convention:
        ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`` with ``C = |x - y|^2``."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what ``prepare`` kept (large buffers, compiled functions)."""


def _loop_inputs(case: PCCase):
    f0 = -case.eps * case.a.log()
    table = torch.full((1, 1), case.eps, dtype=torch.float32)
    return f0, table


def _ours_converged(C, case: PCCase, backend: str, tol: float):
    res = sinkhorn(
        C, case.a, case.b, eps=case.eps, backend=backend, grad="none", tol=tol, max_iter=20000
    )
    plan = res.plan.to_dense() if hasattr(res.plan, "to_dense") else res.plan
    return res.f[0], res.g[0], plan[0]


class OursNative(PCImpl):
    """``sinkhorn(PointCloud(x, y), backend="native")``: its loop, ``ops.solve_points``."""

    key, label, ours = "ours-native", "ours[native]", True
    min_iter = 0

    def prepare(self, case, iters):
        geometry = PointCloud(case.x, case.y)
        self._pts = tuple(t.contiguous() for t in geometry.centred_points())
        self._f0, self._table = _loop_inputs(case)

    def run(self, case, n_iter):
        x, y = self._pts
        return ops.solve_points(
            x,
            y,
            case.a,
            case.b,
            self._f0,
            self._table,
            max_iter=n_iter,
            tol=None,
            method="log",
            cost="sqeuclidean",
            cost_scale=1.0,
        )

    def full_call(self, case, n_iter):
        """The whole ``sinkhorn()`` call (loop + result), for the overhead column."""
        return sinkhorn(
            PointCloud(case.x, case.y),
            case.a,
            case.b,
            eps=case.eps,
            backend="native",
            grad="none",
            tol=None,
            max_iter=n_iter,
        )

    def converged(self, case, tol):
        return _ours_converged(PointCloud(case.x, case.y), case, "native", tol)


class OursTorch(PCImpl):
    """``sinkhorn(PointCloud(x, y), backend="torch")``: its loop on 16 MiB cost blocks."""

    key, label, ours = "ours-torch", "ours[torch]", True
    min_iter = 0

    def unavailable(self, case):
        if case.n > 10000:
            # Not predictable from N = 10 000: with 16 MiB blocks of 83 rows, one iteration
            # took 234 s at 50 000 (D = 3) in the first run, 25x the N*M scaling.
            return "torch backend not run above N=10000 (234 s/iteration at 50 000, D=3, first run)"
        return None

    def prepare(self, case, iters):
        self._geometry = PointCloud(case.x, case.y)
        self._f0, self._table = _loop_inputs(case)

    def run(self, case, n_iter):
        with torch.no_grad():
            return torch_loop_solve(
                self._geometry,
                case.a,
                case.b,
                self._f0,
                self._table,
                max_iter=n_iter,
                tol=None,
                method="log",
            )

    def converged(self, case, tol):
        return _ours_converged(PointCloud(case.x, case.y), case, "torch", tol)


class OursDenseNative(PCImpl):
    """Our dense native solve on the stored cost of the same points (``ops.solve_dense``,
    the loop of ``sinkhorn(C, backend="native")``); the cost is built untimed."""

    key, label, ours = "ours-dense-native", "ours[dense native]", True
    min_iter = 0

    def unavailable(self, case):
        if case.n > DENSE_MAX_N:
            gb = 4 * case.work / 1e9
            return f"dense cost not built above N={DENSE_MAX_N} ({gb:.0f} GB float32)"
        if not fits_in_memory(4 * case.work):
            return "dense cost does not fit in memory"
        return None

    def prepare(self, case, iters):
        self._C = sqeuclidean(case.x, case.y)
        self._f0, self._table = _loop_inputs(case)

    def run(self, case, n_iter):
        return ops.solve_dense(
            self._C, case.a, case.b, self._f0, self._table, max_iter=n_iter, tol=None, method="log"
        )

    def converged(self, case, tol):
        return _ours_converged(sqeuclidean(case.x, case.y), case, "native", tol)

    def release(self):
        self._C = None


def ours_pc_impls(backends: list[str]) -> list[PCImpl]:
    impls: list[PCImpl] = []
    if "native" in backends:
        impls.append(OursNative())
    impls.append(OursTorch())
    if "native" in backends:
        impls.append(OursDenseNative())
    return impls


def plan_from_potentials(case: PCCase, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Our plan formula on the dense cost (only for the small agreement case)."""
    C = sqeuclidean(case.x[0].double(), case.y[0].double())
    a, b = case.a[0].double(), case.b[0].double()
    return (
        a[:, None]
        * b[None, :]
        * torch.exp((f.double()[:, None] + g.double()[None, :] - C) / case.eps)
    )


def potential_difference(case: PCCase, f, g, f_ref, g_ref) -> float:
    """``max |(f, g) - (f_ref, g_ref) - (c, -c)| / eps`` with the best constant ``c``
    (potentials are defined up to ``(f + c, g - c)``), in units of eps."""
    df = f.double() - f_ref.double()
    dg = g.double() - g_ref.double()
    c = 0.5 * (df.mean() - dg.mean())
    return float(torch.cat([(df - c).abs(), (dg + c).abs()]).max() / case.eps)


@dataclass
class PerIter:
    """Result of one implementation's interleaved measurement."""

    per_iter: float
    t_hi: float
    t_lo: float
    n_hi: int
    n_lo: int
    rounds: int


def iteration_counts(impl: PCImpl, n: int) -> tuple[int, int]:
    """``(T0, T)`` for ``impl`` at size ``n`` (same difference ``T - T0`` for everyone)."""
    hi, lo, _ = PC_ITERS[n]
    lo_i = max(lo, impl.min_iter)
    return lo_i, hi + (lo_i - lo)


def measure_interleaved(case: PCCase, impls: list[PCImpl], rounds: int, extra=None):
    """Time ``run(T0)`` and ``run(T)`` of every implementation, round after round.

    ``extra``: optional ``{name: callable}`` timed in the same rounds (the call overhead).
    Returns ``({key: PerIter}, {name: min seconds})``.
    """
    lo_t = {i.key: math.inf for i in impls}
    hi_t = {i.key: math.inf for i in impls}
    extra = extra or {}
    extra_t = {k: math.inf for k in extra}
    for impl in impls:
        if case.n <= impl.warm_up_max_n:
            impl.run(case, iteration_counts(impl, case.n)[0])
    for _ in range(rounds):
        for impl in impls:
            lo, hi = iteration_counts(impl, case.n)
            start = time.perf_counter()
            impl.run(case, lo)
            lo_t[impl.key] = min(lo_t[impl.key], time.perf_counter() - start)
            start = time.perf_counter()
            impl.run(case, hi)
            hi_t[impl.key] = min(hi_t[impl.key], time.perf_counter() - start)
        for name, fn in extra.items():
            if not math.isinf(extra_t[name]):
                continue  # once is enough (seconds per call at N = 10 000)
            start = time.perf_counter()
            fn()
            extra_t[name] = min(extra_t[name], time.perf_counter() - start)
    out = {}
    for impl in impls:
        lo, hi = iteration_counts(impl, case.n)
        per = (hi_t[impl.key] - lo_t[impl.key]) / (hi - lo)
        out[impl.key] = PerIter(per, hi_t[impl.key], lo_t[impl.key], hi, lo, rounds)
    return out, extra_t
