"""Property-based tests (hypothesis) of the solver on random problems."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkhorn_ot import pad_batch, sinkhorn

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw, max_size=8):
    """A random batch: costs, positive weights with equal mass, and eps."""
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_size))
    m = draw(st.integers(1, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    C = torch.rand(batch, n, m, generator=gen, dtype=F64) * draw(st.floats(0.1, 10.0))
    a = torch.rand(batch, n, generator=gen, dtype=F64) + 0.05
    b = torch.rand(batch, m, generator=gen, dtype=F64) + 0.05
    mass = draw(st.floats(0.1, 10.0))
    a, b = mass * a / a.sum(-1, keepdim=True), mass * b / b.sum(-1, keepdim=True)
    eps = draw(st.floats(0.05, 2.0)) * float(C.max().clamp_min(1e-3))
    return C, a, b, eps


def solve(C, a, b, eps, **kw):
    kw.setdefault("tol", 1e-11)
    kw.setdefault("max_iter", 100000)
    return sinkhorn(C, a, b, eps=eps, grad="none", **kw)


@SETTINGS
@given(problems())
def test_marginals_and_nonnegativity(problem):
    C, a, b, eps = problem
    res = solve(C, a, b, eps)
    assert (res.plan >= 0).all()
    mass = a.sum(-1, keepdim=True)
    assert ((res.plan.sum(-1) - a).abs().sum(-1, keepdim=True) <= 1e-10 * mass).all()
    assert torch.allclose(res.plan.sum(-2), b, rtol=1e-12, atol=1e-15)


@SETTINGS
@given(problems(), st.floats(-5.0, 5.0))
def test_constant_shift_of_cost_leaves_plan_unchanged(problem, shift):
    C, a, b, eps = problem
    res = solve(C, a, b, eps)
    shifted = solve(C + shift, a, b, eps)
    assert torch.allclose(shifted.plan, res.plan, rtol=1e-8, atol=1e-14)


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_permutation_equivariance(problem, rnd):
    C, a, b, eps = problem
    n, m = C.shape[1:]
    rows = torch.tensor(rnd.sample(range(n), n))
    cols = torch.tensor(rnd.sample(range(m), m))
    res = solve(C, a, b, eps)
    permuted = solve(C[:, rows][:, :, cols], a[:, rows], b[:, cols], eps)
    assert torch.allclose(permuted.plan, res.plan[:, rows][:, :, cols], rtol=1e-8, atol=1e-14)
    assert torch.allclose(permuted.f, res.f[:, rows], rtol=1e-7, atol=1e-9 * eps)


@SETTINGS
@given(problems())
def test_batch_equals_loop_of_single_problems(problem):
    C, a, b, eps = problem
    res = solve(C, a, b, eps)
    for k in range(C.shape[0]):
        single = solve(C[k], a[k], b[k], eps)
        assert torch.allclose(res.plan[k], single.plan, rtol=1e-12, atol=1e-15)
        assert int(res.n_iter[k]) == int(single.n_iter)


@SETTINGS
@given(problems(max_size=6), st.integers(0, 3), st.integers(0, 3))
def test_padded_equals_unpadded(problem, extra_rows, extra_cols):
    C, a, b, eps = problem
    n, m = C.shape[1:]
    Cs = [C[k] for k in range(C.shape[0])]
    # A larger dummy problem forces padding of all the others.
    dummy = torch.ones(n + extra_rows, m + extra_cols, dtype=F64)
    Cp, ap, bp = pad_batch(
        [*Cs, dummy],
        [*list(a), None],
        [*list(b), None],
    )
    res = solve(Cp, ap, bp, eps)
    ref = solve(C, a, b, eps)
    assert torch.allclose(res.plan[:-1, :n, :m], ref.plan, rtol=1e-8, atol=1e-14)
    assert (res.plan[:-1, n:] == 0).all() and (res.plan[:-1, :, m:] == 0).all()
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()


@SETTINGS
@given(problems())
def test_log_equals_kernel_where_kernel_is_stable(problem):
    C, a, b, eps = problem  # eps >= 0.05 max C: exp(-C/eps) >= e^-20, no underflow
    log = solve(C, a, b, eps, method="log")
    kernel = solve(C, a, b, eps, method="kernel")
    assert torch.allclose(kernel.plan, log.plan, rtol=1e-8, atol=1e-14)
    assert torch.allclose(kernel.f, log.f, rtol=1e-7, atol=1e-9 * eps)
