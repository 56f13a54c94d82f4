"""Our solver as benchmark implementations, and the interface peers share with it.

An :class:`Impl` solves a :class:`~benchmarks.cases.Case` two ways and always returns
the full plan ``(B, N, M)`` (so every implementation pays for materialising it):

* ``per_iter(case, n)``: exactly ``n`` iterations, no stopping test we can turn off;
* ``to_tol(case, tol)``: until the implementation's own stopping rule says the relative
  L1 marginal violation is ``<= tol`` (peers translate ``tol`` into their rule).

Both return ``(plan, info)`` where ``info`` holds what the report shows besides time
(iterations run, calibrated iteration counts, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkhorn_ot import sinkhorn

from .cases import Case, CaseSpec

#: Iteration cap of every to-tolerance run: far above what any case needs, so hitting
#: it means a bug (our solver then warns, which pytest turns into an error).
MAX_ITER_TO_TOL = 20000


def marginal_error(plan: torch.Tensor, case: Case) -> float:
    """Our stopping metric on any plan: ``max_b (|P1 - a|_1 + |P^T 1 - b|_1) / sum(a)``,
    accumulated in float64 so the measurement itself adds no float32 error."""
    P = plan.detach().double()
    a, b = case.a.double(), case.b.double()
    err = (P.sum(2) - a).abs().sum(1) + (P.sum(1) - b).abs().sum(1)  # (B,)
    return float((err / a.sum(1)).max())


def plan_difference(plan: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |P - P_ref| / max P_ref``: the agreement metric between two plans."""
    P, R = plan.detach().double(), reference.detach().double()
    return float((P - R).abs().max() / R.abs().max())


@dataclass
class Impl:
    """Base class of everything the suite times.

    Attributes:
        key: unique id used in test ids and the JSON (``"ours-torch-log"``).
        label: column name in the report (``"ours[torch]"``, ``"POT solve_batch"``).
        family: ``"log"``, ``"kernel"`` or ``"stabilised"``: which of our methods the row
            compares with (peers' log-domain rows compare with both robust methods).
        ours: True for our own solver (columns before the peers, ratio denominator).
    """

    key: str
    label: str
    family: str
    ours: bool = False

    def applies(self, spec: CaseSpec) -> bool:
        """Whether this implementation runs on the case (e.g. Python loops only for small B)."""
        return True

    def prepare(self, case: Case, tol: float) -> None:
        """Untimed set-up before a to-tolerance run (e.g. calibrating an iteration count)."""

    def per_iter(self, case: Case, n_iter: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def to_tol(self, case: Case, tol: float) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class Ours(Impl):
    """:func:`sinkhorn_ot.sinkhorn` with one backend and one method, ``grad="none"``
    (peers return detached plans too). ``schedule``: extra keywords of the eps schedule
    (e.g. ``eps_scaling``, ``eps_stage_iters``) and the ``tag`` naming it in the label."""

    def __init__(self, backend: str, method: str, tag: str = "", **schedule):
        suffix = f"-{tag}" if tag else ""
        label = f"ours[{backend}, {tag}]" if tag else f"ours[{backend}]"
        super().__init__(f"ours-{backend}-{method}{suffix}", label, method, ours=True)
        self.backend, self.method, self.schedule = backend, method, schedule

    def _solve(self, case: Case, **kw):
        return sinkhorn(
            case.C,
            case.a,
            case.b,
            eps=case.eps,
            method=self.method,
            grad="none",
            backend=self.backend,
            **self.schedule,
            **kw,
        )

    def per_iter(self, case, n_iter):
        res = self._solve(case, max_iter=n_iter, tol=None)
        return res.plan, {"n_iter": n_iter}

    def to_tol(self, case, tol):
        res = self._solve(case, max_iter=MAX_ITER_TO_TOL, tol=tol)
        return res.plan, {"n_iter": int(res.n_iter.max())}


#: The stage-wise eps schedule of the benchmark rows: halve eps from the cost scale,
#: three iterations per stage.
STAGES = {"eps_scaling": 0.5, "eps_stage_iters": 3}


def ours_impls(backends: list[str], device: torch.device | None = None) -> list[Impl]:
    """Our solver on every available backend, log and kernel forms; on the native
    backend also the stabilised form, plain and with the stage-wise schedule, and (on
    the CPU: the CUDA loops have none) the log domain with adaptive momentum."""
    impls = [Ours(backend, method) for backend in backends for method in ("log", "kernel")]
    if "native" in backends:
        impls += [Ours("native", "stabilised"), Ours("native", "stabilised", "stages", **STAGES)]
        if device is None or device.type == "cpu":
            impls += [Ours("native", "log", "momentum", momentum="auto")]
    return impls
