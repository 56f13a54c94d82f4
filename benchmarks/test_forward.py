"""Forward timing: every case x {per-iteration, to-tolerance} x every implementation.

Per-iteration: exactly ``PER_ITER`` (100) iterations, ``tol=None``. To-tolerance:
``tol = TOL`` (1e-4) in our metric (peers: their rule translated, see ``peers.py``).
Every run returns the full plan; the achieved marginal error is recorded next to the
time so that to-tolerance rows can be checked for equal accuracy.
"""

from .agreement import ensure_agreement
from .cases import get_case
from .impls import marginal_error
from .registry import get as registry
from .suite import PER_ITER, TOL
from .timing import measure


def test_forward(benchmark, forward_point, bench):
    case_name, mode, key = forward_point
    case = get_case(case_name, bench["device"])
    impl = bench["caps"].impl(key)
    ensure_agreement(case)  # no timing before the plans are known to agree
    if mode == "per_iter":

        def fn():
            return impl.per_iter(case, PER_ITER)
    else:
        impl.prepare(case, TOL)

        def fn():
            return impl.to_tol(case, TOL)

    benchmark.group = f"forward {case_name} {mode}"
    timing, (plan, info) = measure(benchmark, fn, device=bench["device"], budget_s=bench["budget"])
    err = marginal_error(plan, case)
    benchmark.extra_info.update(
        case=case_name, mode=mode, impl=impl.label, family=impl.family, marginal_error=err, **info
    )
    registry().add(
        "forward",
        case_name,
        impl.label,
        timing.min,
        mode=mode,
        key=key,
        family=impl.family,
        ours=impl.ours,
        median=timing.median,
        rounds=timing.rounds,
        marginal_error=err,
        work=case.work,
        **info,
    )
