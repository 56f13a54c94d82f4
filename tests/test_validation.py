"""Bad input (docs/conventions.md, "Masses and precision"; errors name the argument): every case raises with a message naming the argument."""

import pytest
import torch

from sinkhorn_ot import KernelUnderflowError, emd, pad_batch, sinkhorn
from sinkhorn_ot.testing import random_problem

C, A, B = random_problem(2, 4, 3, seed=0)


def call(**overrides):
    kw = {"C": C, "a": A, "b": B, "eps": 0.1, "grad": "none"}
    kw.update(overrides)
    return sinkhorn(kw.pop("C"), kw.pop("a"), kw.pop("b"), **kw)


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"C": "C"}, TypeError, r"`C` must be a torch.Tensor, got str"),  # arrays are fine
        ({"C": C.long()}, TypeError, r"`C` must be a floating tensor.*int64"),
        ({"C": C[0, 0]}, ValueError, r"`C` must have shape \(N, M\) or \(B, N, M\), got 1"),
        ({"C": torch.zeros(2, 0, 3, dtype=torch.float64)}, ValueError, r"`C` must have non-empty"),
        ({"C": C.clone().fill_(float("nan"))}, ValueError, r"`C` must be finite, got 24 NaN"),
        (
            {"C": torch.where(C == C.max(), float("inf"), C)},
            ValueError,
            r"`C` must be finite, got 1 NaN",
        ),
        ({"a": A.int()}, TypeError, r"`a` must be a floating tensor, got dtype torch.int32"),
        ({"a": A[:, :3]}, ValueError, r"`a` must have shape \(B, N\) = \(2, 4\).*got \(2, 3\)"),
        ({"b": B[0]}, ValueError, r"`b` must have shape \(B, M\) = \(2, 3\).*got \(3,\)"),
        ({"a": -A}, ValueError, r"`a` must be non-negative"),
        ({"b": torch.zeros_like(B)}, ValueError, r"`b` must have positive total mass.*\[0, 1\]"),
        (
            {"a": A * 2},
            ValueError,
            r"same total mass.*a.sum\(\) = 2\.0 and b.sum\(\) = (1\.0|0\.9999999999999999) ",
        ),
        ({"a": A.clone().fill_(float("nan"))}, ValueError, r"`a` must be finite"),
        ({"eps": 0.0}, ValueError, r"`eps` must be > 0"),
        ({"eps": -1}, ValueError, r"`eps` must be > 0"),
        ({"eps": None}, TypeError, r"`eps` is required"),
        ({"eps": "0.1"}, TypeError, r"`eps` must be a positive float or a tensor, got str"),
        ({"eps": torch.tensor([0.1, 0.1, 0.1])}, ValueError, r"`eps` must be \(B,\) = \(2,\)"),
        ({"eps": torch.tensor([0.1, 0.0])}, ValueError, r"`eps` must be > 0"),
        ({"eps": torch.tensor([1, 2])}, TypeError, r"`eps` must be a floating tensor"),
        (
            {"method": "sinkhorn"},
            ValueError,
            r"`method` must be one of 'log', 'kernel', 'stabilised', 'auto'",
        ),
        ({"grad": "autodiff"}, ValueError, r"`grad` must be one of"),
        ({"backend": "cuda"}, ValueError, r"`backend` must be one of"),
        ({"max_iter": -1}, ValueError, r"`max_iter` must be >= 0, got -1"),
        ({"max_iter": 10.0}, TypeError, r"`max_iter` must be an int, got float"),
        ({"tol": 0}, ValueError, r"`tol` must be > 0"),
        ({"tol": "1e-5"}, TypeError, r"`tol` must be a positive float, .auto. or None"),
        ({"eps_scaling": 1.5}, ValueError, r"`eps_scaling` must be None or a float in \(0, 1\)"),
        ({"eps_stage_iters": 0}, ValueError, r"`eps_stage_iters` must be >= 1, got 0"),
        ({"init": (A,)}, TypeError, r"`init` must be a pair \(f, g\)"),
        ({"init": (A, A)}, ValueError, r"`init\[1\] \(g\)` must have shape \(2, 3\), got \(2, 4\)"),
        (
            {"init": (A.clone().fill_(float("inf")), B)},
            ValueError,
            r"`init\[0\] \(f\)` must be finite",
        ),
    ],
)
def test_bad_input_names_the_argument(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**overrides)


def test_mixed_devices_are_rejected():
    meta = torch.empty(2, 4, dtype=torch.float64, device="meta")
    with pytest.raises(
        ValueError, match=r"`a` must be on the same device as `C` \(cpu\), got meta"
    ):
        call(a=meta)


def test_native_backend_refuses_unroll():
    from sinkhorn_ot import native

    if not native.availability(torch.device("cpu"), torch.float64)[0]:
        with pytest.raises(RuntimeError, match="backend='native' is not available"):
            call(backend="native")
    else:
        with pytest.raises(ValueError, match="backend='native' cannot unroll"):
            call(backend="native", grad="unroll")


def test_kernel_underflow_raises_and_names_log_method(backend):
    C, a, b = random_problem(2, 5, 5, seed=1)
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        call(C=C * 1000, a=a, b=b, eps=0.01, method="kernel", backend=backend)


def test_auto_falls_back_to_log_instead_of_nan(backend, monkeypatch):
    # Defeat the range heuristic so that "auto" really tries the kernel form first.
    from sinkhorn_ot import solver

    monkeypatch.setitem(solver.KERNEL_SAFE_RANGE, torch.float64, float("inf"))
    C, a, b = random_problem(2, 5, 5, seed=2)
    # Every C_ij / eps > 745: exp(-C / eps) is exactly 0 in float64. (A spread wider than
    # the offset, so that sinkhorn does not take the offset off the cost.)
    res = call(C=20 * C + 8, a=a, b=b, eps=0.01, method="auto", backend=backend, max_iter=100000)
    assert res.method == "log"
    assert torch.isfinite(res.plan).all() and res.converged.all()


def test_pad_batch_errors():
    with pytest.raises(ValueError, match="`list_of_C` must hold at least one"):
        pad_batch([])
    with pytest.raises(TypeError, match="`list_of_C` must be a list"):
        pad_batch(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"`list_of_C\[1\]` must be a 2-D"):
        pad_batch([torch.zeros(2, 3), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"`list_of_a\[0\]` must have shape \(2,\)"):
        pad_batch([torch.zeros(2, 3)], [torch.ones(3)])
    with pytest.raises(ValueError, match=r"`list_of_b` must have one entry per cost matrix \(1\)"):
        pad_batch([torch.zeros(2, 3)], None, [None, None])


def test_emd_validates_like_sinkhorn():
    with pytest.raises(ValueError, match="same total mass"):
        emd(C, A * 3, B)


def _count_host_reads(monkeypatch):
    """Patch every Tensor -> Python conversion to count it (each is a sync on a GPU)."""
    calls = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_valid_input_is_checked_with_one_host_read(monkeypatch):
    from sinkhorn_ot._validation import check_problem

    eps = torch.full((2,), 0.1, dtype=torch.float64)
    calls = _count_host_reads(monkeypatch)
    problem = check_problem(C, A, B, eps)
    assert calls == ["tolist"], calls
    assert problem.C.shape == (2, 4, 3) and problem.eps.shape == (2,)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        # Several faults at once: the first argument's fault is the one reported.
        ({"C": C.clone().fill_(float("nan")), "a": -A}, r"`C` must be finite"),
        ({"a": A.clone().fill_(float("nan")), "b": -B}, r"`a` must be finite"),
        ({"a": -A, "eps": torch.tensor([0.1, -1.0], dtype=torch.float64)}, r"`a` must be non"),
        ({"eps": torch.tensor([0.1, float("nan")], dtype=torch.float64)}, r"`eps`.*got nan"),
    ],
)
def test_first_fault_in_argument_order_is_reported(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


@pytest.mark.parametrize("grad", ["none", "implicit", "envelope"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_call_without_checks_reads_the_host_once(backend, grad, padded, monkeypatch):
    """``tol=None``, ``method="log"``: validation's one read is the call's only host sync
    (each one waits for the GPU; a small problem's call is dominated by them there)."""
    if backend == "torch":
        pytest.skip("the torch loop checks its potentials on the host; native only")
    cost = torch.rand(9, 10, 10, requires_grad=grad != "none")
    a = torch.full((9, 10), 0.1)
    if padded:
        a[:, -1] = 0
        a = a / a.sum(-1, keepdim=True)
    sinkhorn(cost, a, eps=0.1, backend=backend, tol=None, max_iter=5, grad=grad)  # warm
    calls = _count_host_reads(monkeypatch)
    res = sinkhorn(cost, a, eps=0.1, backend=backend, tol=None, max_iter=5, grad=grad)
    monkeypatch.undo()
    assert calls == ["tolist"], calls
    assert res.n_iter.tolist() == [5] * 9
