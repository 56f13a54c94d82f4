"""Peer implementations, adapted to the :class:`~benchmarks.impls.Impl` interface.

Every adapter takes our inputs (same tensors, same device, same ``eps``) and returns
the full plan. How each one's stopping rule is matched to our ``tol`` (the relative L1
marginal violation, docs/conventions.md) is written next to it; the agreement check
(:mod:`benchmarks.agreement`) verifies the resulting plans before anything is timed.

* POT ``ot.solve_batch`` (``method="log_sinkhorn"`` and ``"sinkhorn"``): it stops when
  the L2 norm of the row-marginal residual, maximised over the batch and checked every
  10 iterations, is below its ``tol``. Its column marginal is exact after each
  iteration, and ``|r|_1 <= sqrt(N) |r|_2``, so ``tol_POT = tol * mass / sqrt(N)``
  guarantees our criterion.
* POT ``ot.sinkhorn`` in a Python loop over the problems (unpadded): same idea with the
  column residual (``stopThr = tol * mass / sqrt(M_k)``). Only for ``B <= 64``.
* GeomLoss, when the installed version solves cost matrices (``geomloss.ot``, 0.3+):
  per-iteration rows call the public ``geomloss.ot.solve_batch(C, reg=eps,
  max_iter=n)``; it anneals eps from the cost range down to ``eps`` over those ``n``
  iterations and has no stopping rule (``tol`` must be ``None``), so it cannot be run
  to a tolerance at a fixed eps. To-tolerance rows therefore run GeomLoss's own
  symmetric Sinkhorn loop (``sinkhorn_loop`` with its dense ``softmin``) with eps-scaling
  factor 0.5 (``SamplesLoss``'s default), for the smallest iteration count that reaches
  ``tol`` in our metric, found before timing by doubling from twice our own iteration
  count plus two bisection steps (so it is within 25 % of the true minimum).
* A plain PyTorch log-domain loop: what a user would write in ten lines; its
  to-tolerance run evaluates the plan and our metric every 10 iterations.
"""

from __future__ import annotations

import math
import warnings

import torch

from .cases import Case, CaseSpec
from .impls import MAX_ITER_TO_TOL, Impl, marginal_error

#: ``ot.sinkhorn`` in a Python loop only runs on batches up to this size.
POT_LOOP_MAX_BATCH = 64


def _mass(case: Case) -> float:
    return float(case.a.sum(1).min())


class POTSolveBatch(Impl):
    """``ot.solve_batch(M, reg, a, b, ...)`` of POT (batched, torch backend)."""

    def __init__(self, pot_method: str):
        family = "log" if pot_method == "log_sinkhorn" else "kernel"
        super().__init__(f"pot-batch-{family}", "POT solve_batch", family)
        self.pot_method = pot_method

    def _solve(self, case, max_iter, tol):
        import ot

        res = ot.solve_batch(
            case.C,
            case.eps,
            case.a,
            case.b,
            max_iter=max_iter,
            tol=tol,
            method=self.pot_method,
            grad="detach",
        )
        return res.plan, {"n_iter": int(res.log["n_iter"]) + 1}

    def per_iter(self, case, n_iter):
        # tol=0 never stops early (the test is `err < tol`); the every-10-iterations
        # marginal check still runs: that is part of POT's per-iteration cost.
        return self._solve(case, n_iter, 0.0)

    def to_tol(self, case, tol):
        return self._solve(case, MAX_ITER_TO_TOL, tol * _mass(case) / math.sqrt(case.C.shape[1]))


class POTLoop(Impl):
    """``ot.sinkhorn`` (Sinkhorn-Knopp, kernel form) called once per problem."""

    def __init__(self):
        super().__init__("pot-loop-kernel", "POT ot.sinkhorn loop", "kernel")

    def applies(self, spec: CaseSpec) -> bool:
        return spec.batch <= POT_LOOP_MAX_BATCH

    def _solve(self, case, n_iter, tol):
        import ot

        plan = torch.zeros_like(case.C)
        with warnings.catch_warnings():
            # "did not converge" is expected when we ask for exactly n iterations.
            warnings.simplefilter("ignore")
            for k in range(case.batch):
                C, a, b = case.unpadded(k)
                thr = 0.0 if tol is None else tol * float(a.sum()) / math.sqrt(C.shape[1])
                P = ot.sinkhorn(a, b, C, case.eps, numItermax=n_iter, stopThr=thr, warn=False)
                plan[k, : C.shape[0], : C.shape[1]] = P
        return plan, {}

    def per_iter(self, case, n_iter):
        return self._solve(case, n_iter, None)

    def to_tol(self, case, tol):
        return self._solve(case, MAX_ITER_TO_TOL, tol)


def geomloss_cost_matrix_api() -> tuple[bool, str]:
    """Whether the installed GeomLoss solves explicit cost matrices (``geomloss.ot``)."""
    try:
        import geomloss
        import geomloss.ot as got  # noqa: F401 - GeomLoss >= 0.3
        from geomloss.ot._abstract_solvers import annealing_parameters, sinkhorn_loop  # noqa: F401
    except ImportError as exc:
        return False, f"GeomLoss without a cost-matrix solver ({exc})"
    return True, f"geomloss {geomloss.__version__}"


class GeomLoss(Impl):
    """GeomLoss's symmetric log-domain Sinkhorn on our cost matrices."""

    SCALING = 0.5

    def __init__(self):
        super().__init__("geomloss-log", "GeomLoss", "log")
        self._calibrated: dict[tuple[str, float], int] = {}

    def per_iter(self, case, n_iter):
        import geomloss.ot as got

        res = got.solve_batch(case.C, reg=case.eps, a=case.a, b=case.b, max_iter=n_iter)
        return res.plan, {"n_iter": n_iter}

    def loop(self, case: Case, n_iter: int) -> torch.Tensor:
        """GeomLoss's ``sinkhorn_loop`` with eps-scaling 0.5 floored at ``eps``: the
        annealing of ``SamplesLoss``, then constant-eps iterations until ``n_iter``."""
        from geomloss import _backends as bk
        from geomloss._typing import CostMatrices
        from geomloss.ot._abstract_solvers import annealing_parameters, sinkhorn_loop
        from geomloss.ot._implementations.matrix import softmin_dense

        C, a, b, eps = case.C, case.a, case.b, case.eps
        descent = annealing_parameters(
            maxmin_cost=float(C.max() - C.min()), eps=eps, n_iter=n_iter, scaling=self.SCALING
        )
        pot = sinkhorn_loop(
            softmin=softmin_dense,
            log_a_list=[bk.stable_log(a)],
            log_b_list=[bk.stable_log(b)],
            C_list=[CostMatrices(xy=C, yx=C.transpose(1, 2).contiguous())],
            descent=descent,
            debias=False,
            last_extrapolation=True,
        )
        f, g = pot.f_ba, pot.g_ab  # (B, N), (B, M)
        return a[:, :, None] * b[:, None, :] * torch.exp((f[:, :, None] + g[:, None, :] - C) / eps)

    def prepare(self, case, tol):
        key = (case.name, tol)
        if key in self._calibrated:
            return
        # A count that passed a tighter tol is an upper bound. Start from twice our own
        # iteration count: GeomLoss's averaged (symmetric) updates need 3-4x as many.
        tighter = [n for (name, t), n in self._calibrated.items() if name == case.name and t < tol]
        start = max(8, 2 * _our_iterations(case, tol))
        self._calibrated[key] = calibrate(
            lambda n: self.loop(case, n),
            case,
            tol,
            start,
            known_pass=min(tighter) if tighter else None,
        )

    def to_tol(self, case, tol):
        n_iter = self._calibrated[(case.name, tol)]
        return self.loop(case, n_iter), {"n_iter": n_iter, "calibrated": True}


def _our_iterations(case: Case, tol: float) -> int:
    """Iterations our torch log solver needs on ``case`` for ``tol`` (a cheap start)."""
    from sinkhorn_ot import sinkhorn

    res = sinkhorn(
        case.C, case.a, case.b, eps=case.eps, grad="none", tol=tol, max_iter=MAX_ITER_TO_TOL
    )
    return int(res.n_iter.max())


def calibrate(
    run, case: Case, tol: float, start: int, known_pass: int | None = None, bisect: int = 2
) -> int:
    """Smallest-ish ``n`` with ``marginal_error(run(n)) <= tol``.

    Doubles ``n`` from ``start`` until a run passes (or reaches ``known_pass``, a count
    known to pass), then ``bisect`` bisection steps between the last failing and the
    first passing count: the result is within ``2**-bisect`` of the true minimum.
    """
    failing, n = 0, start
    while True:
        if known_pass is not None and n >= known_pass:
            passing = known_pass
            break
        if marginal_error(run(n), case) <= tol:
            passing = n
            break
        failing, n = n, 2 * n
        if n > MAX_ITER_TO_TOL:
            raise RuntimeError(
                f"GeomLoss did not reach tol={tol:g} on {case.name} "
                f"within {MAX_ITER_TO_TOL} iterations"
            )
    for _ in range(bisect):
        mid = (failing + passing) // 2
        if mid in (failing, passing):
            break
        if marginal_error(run(mid), case) <= tol:
            passing = mid
        else:
            failing = mid
    return passing


def torch_log_loop(C, a, b, eps, n_iter, tol=None, check_every=10):
    """The plain log-domain Sinkhorn loop a user would write (the baseline of the
    "torch loop" column): no early stop per problem, no validation, no autograd tricks."""
    log_a, log_b = a.log(), b.log()  # -inf on padding drops out of the sums
    C_eps = C / eps
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)

    def plan():
        return torch.exp(
            log_a[:, :, None]
            + log_b[:, None, :]
            + f[:, :, None] / eps
            + g[:, None, :] / eps
            - C_eps
        )

    for t in range(n_iter):
        g = -eps * torch.logsumexp(log_a[:, :, None] + f[:, :, None] / eps - C_eps, dim=1)
        f = -eps * torch.logsumexp(log_b[:, None, :] + g[:, None, :] / eps - C_eps, dim=2)
        if tol is not None and (t + 1) % check_every == 0:
            P = plan()
            err = ((P.sum(2) - a).abs().sum(1) + (P.sum(1) - b).abs().sum(1)) / a.sum(1)
            if float(err.max()) <= tol:
                return P, t + 1
    return plan(), n_iter


class TorchLoop(Impl):
    """:func:`torch_log_loop` on the padded batch."""

    def __init__(self):
        super().__init__("torch-loop-log", "torch loop", "log")

    def per_iter(self, case, n_iter):
        P, n = torch_log_loop(case.C, case.a, case.b, case.eps, n_iter)
        return P, {"n_iter": n}

    def to_tol(self, case, tol):
        P, n = torch_log_loop(case.C, case.a, case.b, case.eps, MAX_ITER_TO_TOL, tol)
        return P, {"n_iter": n}


def peer_impls() -> tuple[list[Impl], dict[str, str]]:
    """The available peers, and why any peer is missing."""
    peers: list[Impl] = []
    missing: dict[str, str] = {}
    try:
        import ot

        peers += [POTSolveBatch("log_sinkhorn"), POTSolveBatch("sinkhorn"), POTLoop()]
        if not hasattr(ot, "solve_batch"):
            peers = [POTLoop()]
            missing["POT solve_batch"] = f"POT {ot.__version__} has no ot.solve_batch"
    except ImportError as exc:
        missing["POT"] = str(exc)
    ok, why = geomloss_cost_matrix_api()
    if ok:
        peers.append(GeomLoss())
    else:
        missing["GeomLoss"] = why
    peers.append(TorchLoop())
    return peers, missing


# ---------------------------------------------------------------------------------------
# Point-cloud peers (``test_point_clouds.py``): the cost is computed on the fly.
#
# * POT ``ot.solve_sample(X_a, X_b, a, b, reg=eps, lazy=True, metric="sqeuclidean")``
#   (``empirical_sinkhorn`` with ``isLazy=True``: row blocks of ``batch_size`` points,
#   distances by ``ot.dist`` in NumPy). It stops when the L1 row-marginal error, checked
#   every 10 iterations, is ``<= tol``; ``tol=-1`` never stops, so ``max_iter=n`` runs
#   exactly ``n`` iterations (checked: ``log["niter"] == n - 1``). Its potentials are
#   ``log a + f / eps``, ``log b + g / eps`` in ours.
# * GeomLoss ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps), scaling=s, debias=False,
#   backend="tensorized")`` on ``sqrt(2) x``, ``sqrt(2) y`` (its cost is |x - y|^2 / 2).
#   It runs one symmetric iteration (two soft-mins) per entry of its eps schedule, whose
#   length is set by ``scaling``: ``scaling_for(n)`` picks ``s`` so that the schedule has
#   exactly ``n`` entries (checked against GeomLoss's ``epsilon_schedule``), with the
#   diameter given explicitly. Each call also builds ``C_xy`` and ``C_yx`` (2 N M floats)
#   and does one soft-min pair before and after the schedule: removed by the difference.
#   ``backend="online"`` needs pykeops.
# * OTT-JAX ``PointCloud(x, y, epsilon=eps, batch_size=...)`` (online: cost rows
#   recomputed ``batch_size`` at a time) + ``Sinkhorn(min_iterations=n,
#   max_iterations=n, inner_iterations=n, threshold=1e-30)``: min = max makes OTT scan
#   exactly ``n`` iterations and compute its error once. jitted and compiled
#   (``jax.jit(...).lower(...).compile()``) before timing. Potentials ``f + eps log a``.
# ---------------------------------------------------------------------------------------

from .point_clouds import PCCase, PCImpl, fits_in_memory  # noqa: E402

#: POT's lazy row blocks (points per block). POT's default is 100; 1000 was faster here
#: (fewer Python-level blocks), see ``benchmarks/README.md``.
POT_LAZY_BATCH = 1000
#: OTT-JAX online row blocks.
OTT_BATCH = 1024
#: GeomLoss's converged (agreement) run: its eps schedule with this scaling, then this
#: many iterations at the final eps.
GEOMLOSS_AGREE_SCALING = 0.9
GEOMLOSS_AGREE_ITERS = 2000


class POTSampleLazy(PCImpl):
    key, label = "pot-lazy", "POT solve_sample lazy"
    warm_up_max_n = 1000

    def _solve(self, case: PCCase, max_iter: int, tol: float):
        import ot

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge" when asked for n iterations
            return ot.solve_sample(
                case.x[0],
                case.y[0],
                case.a[0],
                case.b[0],
                metric="sqeuclidean",
                reg=case.eps,
                lazy=True,
                batch_size=POT_LAZY_BATCH,
                max_iter=max_iter,
                tol=tol,
            )

    def prepare(self, case, iters):
        res = self._solve(case, 2, -1.0) if case.n <= 1000 else None
        if res is not None and int(res.log["niter"]) != 1:
            raise RuntimeError(f"POT lazy ran {res.log['niter'] + 1} iterations, not 2")

    def run(self, case, n_iter):
        return self._solve(case, n_iter, -1.0)

    def converged(self, case, tol):
        res = self._solve(case, 100000, tol * float(case.a.sum()))
        f_pot, g_pot = res.potentials
        f = case.eps * (f_pot - case.a[0].log())
        g = case.eps * (g_pot - case.b[0].log())
        return f, g, torch.as_tensor(res.lazy_plan[:])


def pykeops_status() -> str | None:
    """None if pykeops imports, else why not."""
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return "pykeops not installed"
    except Exception as exc:  # a broken pykeops install
        return f"pykeops does not import ({type(exc).__name__})"
    return None


class GeomLossSamples(PCImpl):
    min_iter = 3  # the shortest eps schedule is [diameter^2, diameter^2, blur^2]
    warm_up_max_n = 1000

    def __init__(self, backend: str = "tensorized"):
        self.backend = backend
        self.key = f"geomloss-{backend}"
        self.label = f"GeomLoss {backend}"

    def unavailable(self, case):
        if self.backend == "online":
            return pykeops_status()
        # C_xy and C_yx, plus the soft-min's N x M temporary and the cost's own temporaries
        if not fits_in_memory(5 * 4 * case.work):
            return f"tensorized needs ~{20 * case.work / 1e9:.0f} GB (2 N x M cost matrices + temporaries)"
        return None

    @staticmethod
    def _points(case: PCCase):
        r2 = math.sqrt(2.0)
        return case.x[0] * r2, case.y[0] * r2

    def _diameter(self, case):
        from geomloss._legacy.sinkhorn_divergence import max_diameter

        return max_diameter(*self._points(case))

    def scaling_for(self, case: PCCase, n_iter: int) -> float:
        """``scaling`` whose eps schedule has exactly ``n_iter`` entries."""
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule

        diameter, blur = self._diameter(case), math.sqrt(case.eps)
        span = math.log(diameter) - math.log(blur)
        k = n_iter - 2  # entries between diameter^2 and blur^2
        s = math.exp(-span / (k - 0.5))
        assert len(epsilon_schedule(2, diameter, blur, s)) == n_iter, (n_iter, s)
        return s

    def _loss(self, case, scaling):
        from geomloss import SamplesLoss

        return SamplesLoss(
            "sinkhorn",
            p=2,
            blur=math.sqrt(case.eps),
            scaling=scaling,
            diameter=self._diameter(case),
            debias=False,
            potentials=True,
            backend=self.backend,
        )

    def prepare(self, case, iters):
        self._losses = {n: self._loss(case, self.scaling_for(case, n)) for n in iters}
        self._pts = self._points(case)

    def run(self, case, n_iter):
        x, y = self._pts
        return self._losses[n_iter](case.a[0], x, case.b[0], y)

    def converged(self, case, tol):
        """GeomLoss's own loop and soft-min (``sinkhorn_loop`` + ``softmin_tensorized``,
        what ``SamplesLoss`` runs) on its eps schedule, then ``GEOMLOSS_AGREE_ITERS``
        more symmetric iterations at the final eps: ``SamplesLoss`` itself stops after
        one iteration at ``blur^2``, which is not converged to ``tol``."""
        from geomloss._legacy.sinkhorn_divergence import (
            epsilon_schedule,
            log_weights,
            sinkhorn_loop,
        )
        from geomloss._legacy.sinkhorn_samples import cost_routines, softmin_tensorized

        from .point_clouds import plan_from_potentials

        x, y = (t.unsqueeze(0) for t in self._points(case))
        a, b = case.a, case.b
        blur = math.sqrt(case.eps)
        schedule = epsilon_schedule(2, self._diameter(case), blur, GEOMLOSS_AGREE_SCALING)
        schedule += [blur**2] * GEOMLOSS_AGREE_ITERS
        cost = cost_routines[2]
        _, _, g_ab, f_ba = sinkhorn_loop(
            softmin_tensorized,
            log_weights(a),
            log_weights(b),
            None,
            None,
            cost(x, y),
            cost(y, x),
            schedule,
            None,
            debias=False,
        )
        F, G = f_ba.reshape(-1), g_ab.reshape(-1)
        return F, G, plan_from_potentials(case, F, G)

    def release(self):
        self._losses = {}


class OTTPointCloud(PCImpl):
    """OTT-JAX ``PointCloud`` + ``Sinkhorn``: ``online=True`` recomputes the cost rows
    ``OTT_BATCH`` at a time (``batch_size``), ``online=False`` stores the cost matrix
    (``batch_size=None``; only where it fits)."""

    def __init__(self, online: bool = True):
        self.online = online
        self.key = "ott-online" if online else "ott-stored"
        self.label = "OTT-JAX online" if online else "OTT-JAX stored cost"
        self._broken: str | None = None
        self._probed = False

    def _batch(self, case: PCCase) -> int | None:
        return min(OTT_BATCH, case.n) if self.online else None

    def _compiled(self, case: PCCase, n_iter: int | None, tol: float = 1e-30, batch=None):
        import jax
        import jax.numpy as jnp
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn

        if n_iter is None:  # converged run
            solver = ott_sinkhorn.Sinkhorn(threshold=tol, max_iterations=100000)
        else:
            solver = ott_sinkhorn.Sinkhorn(
                threshold=tol, min_iterations=n_iter, max_iterations=n_iter, inner_iterations=n_iter
            )

        def solve(x, y, a, b):
            geom = pointcloud.PointCloud(x, y, epsilon=case.eps, batch_size=batch)
            return solver(linear_problem.LinearProblem(geom, a, b))

        args = tuple(jnp.asarray(t[0].numpy()) for t in (case.x, case.y, case.a, case.b))
        return jax.jit(solve).lower(*args).compile(), args

    def _probe(self) -> str | None:
        """Whether OTT's online mode compiles with the installed JAX (once)."""
        if not self._probed:
            self._probed = True
            tiny = PCCase(
                "probe",
                torch.rand(1, 8, 2),
                torch.rand(1, 8, 2),
                torch.full((1, 8), 1 / 8),
                torch.full((1, 8), 1 / 8),
                0.1,
                2,
            )
            try:
                self._compiled(tiny, 2, batch=4)
            except Exception as exc:  # e.g. AttributeError from a newer JAX
                import jax
                import ott

                self._broken = (
                    f"does not run with the installed versions (ott-jax {ott.__version__}, "
                    f"jax {jax.__version__}): {type(exc).__name__}: {str(exc)[:120]}"
                )
        return self._broken

    def unavailable(self, case):
        if self.online:
            return self._probe()
        if not fits_in_memory(3 * 4 * case.work):
            return f"stored cost does not fit ({4 * case.work / 1e9:.0f} GB)"
        if case.n > 10000:
            return "stored cost only up to N=10000"
        return None

    def prepare(self, case, iters):
        self._fns = {n: self._compiled(case, n, batch=self._batch(case)) for n in iters}

    def run(self, case, n_iter):
        fn, args = self._fns[n_iter]
        out = fn(*args)
        out.f.block_until_ready()
        out.g.block_until_ready()
        return out

    def converged(self, case, tol):
        import numpy as np

        fn, args = self._compiled(case, None, tol, batch=self._batch(case))
        out = fn(*args)
        f = torch.as_tensor(np.asarray(out.f)) - case.eps * case.a[0].log()
        g = torch.as_tensor(np.asarray(out.g)) - case.eps * case.b[0].log()
        return f, g, torch.as_tensor(np.asarray(out.matrix))

    def release(self):
        self._fns = {}


def point_cloud_peers() -> tuple[list[PCImpl], dict[str, str]]:
    """The point-cloud peers that import here, and why the others are absent."""
    peers: list[PCImpl] = []
    missing: dict[str, str] = {}
    try:
        import ot

        if hasattr(ot, "solve_sample"):
            peers.append(POTSampleLazy())
        else:
            missing["POT solve_sample"] = f"POT {ot.__version__} has no ot.solve_sample"
    except ImportError as exc:
        missing["POT"] = str(exc)
    try:
        import geomloss  # noqa: F401

        peers.append(GeomLossSamples("tensorized"))
        peers.append(GeomLossSamples("online"))  # marked unavailable without pykeops
    except ImportError as exc:
        missing["GeomLoss"] = str(exc)
    try:
        import ott  # noqa: F401
        from ott.geometry import pointcloud  # noqa: F401
    except ImportError as exc:
        missing["OTT-JAX"] = str(exc)
    else:
        peers += [OTTPointCloud(online=True), OTTPointCloud(online=False)]
    return peers, missing
