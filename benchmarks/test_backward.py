"""Backward timing for every grad mode that exists: forward + backward, and backward
alone (forward in pytest-benchmark's untimed ``setup``).

Forward setting: 100 iterations, ``tol=None``; loss ``value.sum()`` (the one output
every grad mode differentiates, envelope included), gradient w.r.t. ``C``.
"""

from sinkhorn_ot import sinkhorn

from .cases import get_case
from .registry import get as registry
from .suite import PER_ITER
from .timing import measure


def test_backward(benchmark, backward_point, bench):
    case_name, grad, backend, method, what = backward_point
    case = get_case(case_name, bench["device"])
    C = case.C.clone().requires_grad_(True)

    def forward():
        C.grad = None
        res = sinkhorn(
            C,
            case.a,
            case.b,
            eps=case.eps,
            method=method,
            grad=grad,
            backend=backend,
            max_iter=PER_ITER,
            tol=None,
        )
        return res.value.sum()

    benchmark.group = f"backward {case_name} {grad}"
    if what == "fwd+bwd":
        timing, _ = measure(
            benchmark,
            lambda: forward().backward(),
            device=bench["device"],
            budget_s=bench["budget"],
        )
    else:
        timing, _ = measure(
            benchmark,
            lambda loss: loss.backward(),
            device=bench["device"],
            budget_s=bench["budget"],
            setup=lambda: ((forward(),), {}),
        )
    assert C.grad is not None and bool(C.grad.isfinite().all())
    benchmark.extra_info.update(
        case=case_name, grad=grad, backend=backend, method=method, what=what
    )
    registry().add(
        "backward",
        case_name,
        f"ours[{backend}]",
        timing.min,
        grad=grad,
        backend=backend,
        method=method,
        what=what,
        rounds=timing.rounds,
    )
