"""Peer implementations, adapted to the :class:`~benchmarks.impls.Impl` interface.

Every adapter takes our inputs (same tensors, same device, same ``eps``) and returns
the full plan. How each one's stopping rule is matched to our ``tol`` (the relative L1
marginal violation, DESIGN §2) is written next to it; the agreement check
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
