"""Check that every implementation's plan agrees with ours before anything is timed.

The reference is our torch backend in the log domain run to ``REFERENCE_TOL`` (1e-5).
Every implementation (our other backends and methods, every peer) is then run at its
to-tolerance setting (``tol = 1e-4`` translated into its own stopping rule, exactly the
run that is timed later) and must satisfy

    max |P - P_ref| / max P_ref <= limit,  limit = max(PLAN_RTOL, 2 * own)

where ``own`` is the same difference for our own torch solver at ``tol = 1e-4``: a plan
that is only required to meet the marginals to 1e-4 cannot be expected to be closer to
the converged plan than about that (on the 256x32x32 grid point our own run is 8e-4
away), while a real disagreement (another eps convention, a transposed cost, a wrong
weight) is of order 0.1 to 1. Comparing converged plans rather than fixed iteration
counts is what makes this fair to peers whose iteration order and stopping rules differ
from ours (docs/migrating.md compares the stopping rules). A disagreement stops the whole session (exit status 3): a speed
ratio against a solver that computes something else would be meaningless.
"""

from __future__ import annotations

import time

import pytest

from .cases import Case, CaseSpec
from .impls import MAX_ITER_TO_TOL, marginal_error, plan_difference
from .registry import get as registry
from .suite import TOL, detect

#: Tolerance of the reference solve (float32 reaches it on every case; docs/conventions.md, "Stopping rule").
REFERENCE_TOL = 1e-5
#: Tolerance of the compared runs: the to-tolerance setting of the forward timings.
AGREE_TOL = TOL
#: Smallest plan-difference limit, as a fraction of the largest plan entry.
PLAN_RTOL = 1e-3

_DONE: dict[str, dict[str, float]] = {}


def reference_plan(case: Case):
    from sinkhorn_ot import sinkhorn

    res = sinkhorn(
        case.C,
        case.a,
        case.b,
        eps=case.eps,
        method="log",
        backend="torch",
        grad="none",
        tol=REFERENCE_TOL,
        max_iter=MAX_ITER_TO_TOL,
    )
    return res.plan


def ensure_agreement(case: Case) -> dict[str, float]:
    """Run the agreement check for ``case`` once per session; stop pytest on failure.

    Returns:
        ``{impl key: plan difference}`` for every implementation that applies.
    """
    if case.name in _DONE:
        return _DONE[case.name]
    caps = detect(str(case.C.device))
    ref = reference_plan(case)
    spec = CaseSpec(case.name, case.batch, case.shape)
    impls = [i for i in caps.impls if i.applies(spec)]
    # Our torch log solver first: its own distance to the reference sets the limit.
    impls.sort(key=lambda i: i.key != "ours-torch-log")
    diffs: dict[str, float] = {}
    limit = PLAN_RTOL
    for impl in impls:
        start = time.perf_counter()
        impl.prepare(case, AGREE_TOL)  # shared with the timed to-tolerance run
        plan, info = impl.to_tol(case, AGREE_TOL)
        info["seconds"] = time.perf_counter() - start  # untimed stage: wall time for the log
        diff = plan_difference(plan, ref)
        err = marginal_error(plan, case)
        if impl.key == "ours-torch-log":
            limit = max(PLAN_RTOL, 2 * diff)
        diffs[impl.key] = diff
        registry().add(
            "agreement",
            case.name,
            impl.label,
            diff,
            key=impl.key,
            family=impl.family,
            marginal_error=err,
            limit=limit,
            **info,
        )
        if not diff <= limit:  # also catches NaN
            pytest.exit(
                f"agreement check failed on {case.name}: {impl.label} ({impl.key}) plan differs "
                f"from ours by {diff:.3g} of the largest entry (limit {limit:.3g}); its "
                f"marginal error is {err:.3g}. Not timing an implementation that computes "
                "something else.",
                returncode=3,
            )
    _DONE[case.name] = diffs
    return diffs


def agreement_limit(case_name: str) -> float:
    """The limit used for ``case_name`` (for the test's own assert)."""
    recs = registry().select("agreement", case=case_name)
    return max((r.info["limit"] for r in recs), default=PLAN_RTOL)
