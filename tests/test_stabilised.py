"""method="stabilised": the log-domain iterates by the stabilised kernel form.

The oracle is the torch backend's log domain (`sinkhorn_ot._loop.solve_potentials` with
method="log"): on every case that tests/test_native.py covers for the log domain, and at
eps down to 1e-4 times the cost scale (where the plain kernel form underflows), the
stabilised native loop must give the same potentials (1e-10 relative in float64, 1e-5 in
float32), the same iteration counts and the same errors, and never a NaN. POT's
log-domain solver is an independent check of the fixed point.
"""

from __future__ import annotations

import pytest
import torch

from sinkhorn_ot import native, pad_batch, sinkhorn
from sinkhorn_ot._loop import solve_potentials as torch_solve
from sinkhorn_ot.testing import assert_close_rel, default_init, random_problem

DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, reason = native.availability(torch.device("cpu"), torch.float64)
    if not ok:
        pytest.skip(f"native-cpu unavailable: {reason}")


def normalised(f, g, a, b):
    """(f + c, g - c) with <f, a> = <g, b>: potentials are defined up to that constant."""
    shift = ((g * b).sum(-1) - (f * a).sum(-1)).unsqueeze(-1) / (2 * a.sum(-1, keepdim=True))
    return f + shift, g - shift


def problem(batch, n, m, dtype, seed=0, eps=0.1):
    C, a, b = random_problem(batch, n, m, dtype=dtype, seed=seed)
    return C, a, b, torch.full((batch,), eps, dtype=dtype)


def both(C, a, b, eps, f0=None, **kw):
    """The torch log domain and the native stabilised loop from the same start."""
    if f0 is None:
        f0 = default_init(a, eps)
    ref = torch_solve(C, a, b, eps, f0, method="log", **kw)
    out = native.solve_potentials(C, a, b, eps, f0, method="stabilised", **kw)
    return ref, out


def assert_parity(ref, out, dtype, err_rtol=None):
    rtol = RTOL[dtype]
    (f_r, g_r, it_r, err_r), (f_n, g_n, it_n, err_n) = ref, out
    assert f_n.dtype == dtype and g_n.dtype == dtype
    assert bool(torch.isfinite(f_n).all() and torch.isfinite(g_n).all())
    assert torch.equal(it_n, it_r), f"n_iter: stabilised {it_n.tolist()} vs log {it_r.tolist()}"
    assert_close_rel(f_n, f_r, rtol, "f")
    assert_close_rel(g_n, g_r, rtol, "g")
    assert_close_rel(err_n, err_r, err_rtol or 100 * rtol, "err")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(3, 7, 5), (2, 33, 70), (4, 1, 9), (2, 9, 1), (1, 128, 100), (5, 16, 16)]
)
def test_parity_fixed_iterations(shape, dtype):
    C, a, b, eps = problem(*shape, dtype)
    ref, out = both(C, a, b, eps, max_iter=40, tol=None)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_early_stopping_per_problem(dtype):
    C, a, b, _ = problem(6, 20, 30, dtype, seed=1)
    eps = torch.tensor([0.5, 0.2, 0.1, 0.08, 0.3, 0.15], dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, max_iter=2000, tol=tol)
    assert_parity(ref, out, dtype)
    assert bool((out[3] <= tol).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_ragged_padding(dtype):
    gen = torch.Generator().manual_seed(3)
    sizes = [(5, 6), (3, 4), (9, 2), (1, 7), (13, 11)]
    C, a, b = pad_batch([torch.rand(n, m, generator=gen, dtype=dtype) for n, m in sizes])
    eps = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.07], dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, max_iter=3000, tol=tol)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 12, 10), (3, 41, 70)])
def test_parity_interior_zero_weights(shape, dtype):
    C, a, b, eps = problem(*shape, dtype, seed=4)
    a[:, 3] = 0
    a[1, 0] = 0
    b[:, 5] = 0
    b[1, :2] = 0
    b[2, -1] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    ref, out = both(C, a, b, eps, max_iter=50, tol=None)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_warm_start(dtype):
    C, a, b, eps = problem(4, 17, 23, dtype, seed=5)
    f0 = torch.randn(4, 17, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.1
    ref, out = both(C, a, b, eps, f0=f0, max_iter=25, tol=None)
    assert_parity(ref, out, dtype)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, f0=ref[0], max_iter=500, tol=tol)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_eps_scaling(dtype):
    # Annealing changes eps every iteration: K~ is rebuilt on each change.
    C, a, b, _ = problem(3, 15, 12, dtype, seed=6)
    eps = torch.tensor([0.02, 0.05, 0.03], dtype=dtype)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    ref, out = both(C, a, b, eps, max_iter=3000, tol=tol, eps_scaling=0.7)
    assert_parity(ref, out, dtype)
    ref, out = both(C, a, b, eps, max_iter=6, tol=None, eps_scaling=0.5)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_max_iter_zero(dtype):
    C, a, b, eps = problem(2, 5, 6, dtype)
    ref, out = both(C, a, b, eps, max_iter=0, tol=1e-5)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_parity_large_problem_both_parallel_paths(dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 300, 257), (8, 40, 33)]:
            C, a, b, eps = problem(*shape, dtype, seed=7, eps=0.05)
            ref, out = both(C, a, b, eps, max_iter=30, tol=None)
            assert_parity(ref, out, dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1e-2, 1e-3, 1e-4])
def test_parity_small_eps_where_the_kernel_form_underflows(dtype, ratio):
    # eps = ratio * max|C|: exp(-C / eps) underflows (the kernel form raises below), the
    # stabilised form follows the log domain, iterate for iterate, from the first step
    # (scalings far out of range: exact fallback) to the fixed point.
    C, a, b, _ = problem(3, 24, 31, dtype, seed=13)
    eps = torch.full((3,), ratio, dtype=dtype) * C.amax(dim=(1, 2))
    if ratio <= 1e-3:  # the largest entries of exp(-C / eps) underflow
        assert bool((torch.exp(-C / eps.view(-1, 1, 1)) == 0).any())
    ref, out = both(C, a, b, eps, max_iter=60, tol=None)
    assert_parity(ref, out, dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, max_iter=20000, tol=tol)
    assert bool((out[3] <= tol).all())
    if dtype == torch.float64:
        assert_parity(ref, out, dtype)
        return
    # float32, thousands of iterations: rounding differs by ulps per step, so the two
    # loops may cross tol an iteration or a few apart; the fixed points agree to 1e-5.
    assert bool(((out[2] - ref[2]).abs() <= 0.01 * ref[2]).all()), (out[2], ref[2])
    (f_r, g_r), (f_n, g_n) = normalised(*ref[:2], a, b), normalised(*out[:2], a, b)
    assert_close_rel(f_n, f_r, 1e-5, "f (normalised)")
    assert_close_rel(g_n, g_r, 1e-5, "g (normalised)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_never_nan_on_extreme_inputs(dtype):
    # Wide costs (C / eps up to 1e6), weights over 30 orders of magnitude, a warm start
    # far from the solution: the log domain stays finite, so must the stabilised form.
    gen = torch.Generator().manual_seed(14)
    C = (torch.rand(2, 19, 23, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    a = torch.logspace(-30 if dtype == torch.float64 else -20, 0, 19, dtype=dtype).expand(2, -1)
    a = (a / a.sum(-1, keepdim=True)).contiguous()
    b = torch.full((2, 23), 1 / 23, dtype=dtype)
    eps = torch.tensor([1e-3, 1.0], dtype=dtype)
    f0 = torch.randn(2, 19, generator=gen, dtype=torch.float64).to(dtype) * 100
    ref, out = both(C, a, b, eps, f0=f0, max_iter=30, tol=None)
    # err is a violation near 1 here, from potentials of size 1e3: 1e-2 relative in float32.
    assert_parity(ref, out, dtype, err_rtol=1e-2 if dtype == torch.float32 else None)


def test_exp_terms_accuracy():
    # The kernels' vector exponential against torch.exp (their throughput is the exp
    # floor of the benchmarks). The bound is the rounding of the argument x * log2(e),
    # |x| ulp(1) relative (5e-6 at x = -80 in float32), as for every exp of a product.
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 3e-14)):
        x = -torch.linspace(0, 80, 10007, dtype=dtype)
        assert_close_rel(
            torch.ops.sinkhorn_ot.exp_terms(x) / torch.exp(x), torch.ones_like(x), rtol, "exp"
        )


def test_fixed_point_matches_pot():
    ot = pytest.importorskip("ot")
    C, a, b = random_problem(1, 30, 40, seed=15)
    eps = 1e-3 * float(C.max())  # the kernel form underflows here
    res = sinkhorn(C[0], a[0], b[0], eps=eps, method="stabilised", tol=1e-11, max_iter=50000)
    assert res.method == "stabilised" and bool(res.converged)
    plan = ot.bregman.sinkhorn_log(
        a[0].numpy(), b[0].numpy(), C[0].numpy(), eps, numItermax=200000, stopThr=1e-13
    )
    assert_close_rel(res.plan, torch.as_tensor(plan), 1e-8, "plan")


def test_sinkhorn_reports_the_method_and_matches_the_torch_backend():
    C, a, b = random_problem(3, 11, 14, seed=10)
    kw = {"eps": 0.01, "grad": "none", "tol": 1e-9, "max_iter": 20000}
    stabilised = sinkhorn(C, a, b, method="stabilised", backend="native", **kw)
    reference = sinkhorn(C, a, b, method="log", backend="torch", **kw)
    assert stabilised.method == "stabilised" and stabilised.backend == "native"
    assert torch.equal(stabilised.n_iter, reference.n_iter)
    for name in ("plan", "f", "g", "value"):
        assert_close_rel(getattr(stabilised, name), getattr(reference, name), 1e-10, name)
