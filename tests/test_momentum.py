"""Momentum (over-relaxation) in the Sinkhorn loop: ``sinkhorn(..., momentum=)``.

Oracles: POT's log-domain Sinkhorn converged far below the tolerance (the fixed point
does not depend on the path), the plan's own marginals (the stopping rule must count
both once ``g`` is blended), and the torch loop for the native one (same iterates,
iteration counts and errors).
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch

from sinkhorn_ot import PointCloud, native, ops, sinkhorn
from sinkhorn_ot._loop import MOMENTUM_THRESHOLD, eps_table, solve
from sinkhorn_ot.geometry import DenseCost
from sinkhorn_ot.testing import assert_close_rel, default_init

F64 = torch.float64


def clouds(seed, batch=3, n=30, m=24, d=2, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=F64).to(dtype)
    y = (torch.randn(batch, m, d, generator=gen, dtype=F64) + 0.5).to(dtype)
    return x, y


def hard_cost(seed=0):
    """Small eps relative to the cost: plain Sinkhorn needs hundreds of iterations."""
    x, y = clouds(seed)
    return 0.5 * torch.cdist(x, y) ** 2, 0.02


def plan_violation(plan, a, b):
    rows = (plan.sum(-1) - a).abs().sum(-1)
    cols = (plan.sum(-2) - b).abs().sum(-1)
    return (rows + cols) / a.sum(-1)


@pytest.mark.parametrize("momentum", [1.5, "auto"])
def test_same_fixed_point_as_pot_in_fewer_iterations(momentum):
    C, eps = hard_cost()
    settings = {"tol": 1e-9, "max_iter": 20000, "backend": "torch", "newton": False}
    plain = sinkhorn(C, eps=eps, **settings)
    fast = sinkhorn(C, eps=eps, **settings, momentum=momentum)
    assert bool(fast.converged.all())
    assert bool((fast.n_iter < plain.n_iter).all()), (fast.n_iter, plain.n_iter)
    for k in range(C.shape[0]):
        a = np.full(C.shape[1], 1 / C.shape[1])
        b = np.full(C.shape[2], 1 / C.shape[2])
        want = ot.sinkhorn(a, b, C[k].numpy(), eps, method="sinkhorn_log", numItermax=100000,
                           stopThr=1e-13)  # fmt: skip
        assert np.abs(fast.plan[k].numpy() - want).sum() <= 1e-7


@pytest.mark.parametrize("momentum", [1.8, "auto"])
def test_err_counts_both_marginals_of_the_returned_plan(momentum):
    C, eps = hard_cost(1)
    res = sinkhorn(C, eps=eps, tol=1e-6, max_iter=5000, backend="torch", momentum=momentum)
    a, b = (
        torch.full(C.shape[:2], 1 / C.shape[1], dtype=F64),
        torch.full((C.shape[0], C.shape[2]), 1 / C.shape[2], dtype=F64),
    )
    measured = plan_violation(res.plan, a, b)
    assert_close_rel(res.err, measured, 1e-6, "err")
    assert bool((measured <= 1e-6).all()) and bool(res.converged.all())
    # Stopped short: converged=False, and err is the plan's (column part included).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        short = sinkhorn(C, eps=eps, tol=1e-12, max_iter=40, backend="torch", momentum=momentum)
    assert not bool(short.converged.any())
    assert_close_rel(short.err, plan_violation(short.plan, a, b), 1e-6, "err")


def test_momentum_one_is_plain_sinkhorn_bit_for_bit():
    C, _ = hard_cost(2)
    for backend in ("torch", "native"):
        plain = sinkhorn(C, eps=0.05, tol=1e-7, max_iter=3000, backend=backend)
        same = sinkhorn(C, eps=0.05, tol=1e-7, max_iter=3000, backend=backend, momentum=1.0)
        assert torch.equal(plain.plan, same.plan) and torch.equal(plain.n_iter, same.n_iter)


@pytest.mark.parametrize("momentum", [1.7, "auto"])
def test_momentum_engages_only_near_the_fixed_point(momentum):
    """While the error is above MOMENTUM_THRESHOLD the iterates are plain Sinkhorn's."""
    C, eps = hard_cost(3)
    kw = dict(eps=eps, tol=None, backend="torch", grad="none")
    early = sinkhorn(C, **kw, max_iter=3)
    assert bool((early.err > MOMENTUM_THRESHOLD).all())  # still far: not engaged
    assert_close_rel(sinkhorn(C, **kw, max_iter=3, momentum=momentum).f, early.f, 1e-13, "f")
    late, plain = (
        sinkhorn(C, **kw, max_iter=200, momentum=momentum),
        sinkhorn(C, **kw, max_iter=200),
    )
    assert float((late.f - plain.f).abs().max()) > 1e-8  # engaged in between
    assert bool((late.err < plain.err).all())  # and it helped here


def _padded(a, b):
    a, b = a.clone(), b.clone()
    a[0, 25:] = 0  # trailing padding rows
    b[1, 20:] = 0  # trailing padding columns
    a[2, 3] = 0  # an interior zero weight
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("kind", ["dense", "points"])
@pytest.mark.parametrize("momentum", [1.6, "auto"])
@pytest.mark.parametrize("schedule", [None, 0.5])
@pytest.mark.parametrize("tol", [1e-6, None])
def test_native_loop_equals_torch_loop(dtype, kind, momentum, schedule, tol):
    if not native.availability("cpu", dtype)[0]:
        pytest.skip("the native CPU kernels are not built here")
    x, y = clouds(4, dtype=dtype)
    a = torch.full(x.shape[:2], 1 / x.shape[1], dtype=dtype)
    b = torch.full(y.shape[:2], 1 / y.shape[1], dtype=dtype)
    a, b = _padded(a, b)
    geometry = (
        PointCloud(x, y, "sqeuclidean", scale=0.5)
        if kind == "points"
        else DenseCost(0.5 * torch.cdist(x.double(), y.double()).to(dtype) ** 2)
    )
    eps = torch.full((3,), 0.05, dtype=dtype)
    table = eps_table(eps, geometry.scale(), schedule, 2)
    f0 = default_init(a, eps)
    if tol is not None and dtype == torch.float32:
        tol = 1e-4  # 1e-6 is float32's rounding floor here: the stopping step is chance
    settings = dict(max_iter=300 if tol is None else 3000, tol=tol, method="log")
    ref = solve(geometry, a, b, f0, table, momentum=momentum, **settings)
    if kind == "points":
        out = ops.solve_points(x, y, a, b, f0, table, cost="sqeuclidean", cost_scale=0.5,
                               momentum=momentum, **settings)  # fmt: skip
    else:
        out = ops.solve_dense(geometry.C, a, b, f0, table, momentum=momentum, **settings)
    if dtype == F64:
        if tol is not None:
            assert torch.equal(out[2], ref[2]), (out[2], ref[2])
        assert_close_rel(out[0], ref[0], 1e-9, "f")
        assert_close_rel(out[1], ref[1], 1e-9, "g")
        assert_close_rel(out[3], ref[3], 1e-7, "err")
        return
    # float32: the loops round differently (fused multiply-adds), and momentum carries a
    # rounding difference on, so a problem may stop one iteration apart.
    assert bool(((out[2] - ref[2]).abs() <= 1).all()), (out[2], ref[2])
    if tol is not None:
        assert bool((out[3] <= tol).all()) and bool((ref[3] <= tol).all())
    assert_close_rel(out[0], ref[0], 1e-3, "f")
    assert_close_rel(out[1], ref[1], 1e-3, "g")


def test_sinkhorn_native_and_torch_agree_with_momentum():
    if not native.availability("cpu", F64)[0]:
        pytest.skip("the native CPU kernels are not built here")
    C, eps = hard_cost(5)
    torch_res = sinkhorn(C, eps=eps, tol=1e-8, max_iter=5000, backend="torch", momentum="auto")
    native_res = sinkhorn(C, eps=eps, tol=1e-8, max_iter=5000, backend="native", momentum="auto")
    assert torch.equal(torch_res.n_iter, native_res.n_iter)
    assert_close_rel(native_res.plan, torch_res.plan, 1e-8, "plan")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 2.0}, ValueError, r"`momentum` must lie in \(0, 2\)"),
        ({"momentum": 0.0}, ValueError, r"`momentum` must lie in \(0, 2\)"),
        ({"momentum": "fast"}, ValueError, r"`momentum` must be None, 'auto' or a float"),
        ({"momentum": True}, TypeError, r"`momentum` must be None, 'auto' or a float"),
        ({"momentum": 1.5, "rho_a": 1.0}, ValueError, r"`momentum` needs balanced problems"),
        ({"momentum": 1.5, "stop": "potentials"}, ValueError, r"`momentum` needs balanced"),
        (
            {"momentum": 1.5, "method": "stabilised", "backend": "native"},
            ValueError,
            r"`momentum` runs with method 'log', 'kernel' or 'auto'",
        ),
    ],
)
def test_bad_momentum_arguments(kwargs, error, match):
    C, eps = hard_cost()
    with pytest.raises(error, match=match):
        sinkhorn(C, eps=eps, **kwargs)


def test_op_rejects_momentum_where_it_is_undefined():
    if not native.availability("cpu", F64)[0]:
        pytest.skip("the native CPU kernels are not built here")
    C, _ = hard_cost()
    a = torch.full(C.shape[:2], 1 / C.shape[1], dtype=F64)
    b = torch.full((3, C.shape[2]), 1 / C.shape[2], dtype=F64)
    table = torch.full((3, 1), 0.1, dtype=F64)
    f0 = torch.zeros_like(a)
    with pytest.raises(RuntimeError, match=r"`momentum` must lie in \(0, 2\), got 2.5"):
        torch.ops.sinkhorn_ot.solve(C, a, b, f0, table, 10, None, "log", None, "marginals", 2.5)
    rho = torch.ones(3, 2, dtype=F64)
    with pytest.raises(RuntimeError, match=r"`momentum` needs balanced problems"):
        torch.ops.sinkhorn_ot.solve(C, a, b, f0, table, 10, None, "log", rho, "marginals", 1.5)
    torch.library.opcheck(
        torch.ops.sinkhorn_ot.solve.default,
        (C, a, b, f0, table, 10, 1e-6, "log", None, "marginals", 1.5, True),
    )


def test_sharded_solves_reject_momentum():
    C, eps = hard_cost()
    with pytest.raises(NotImplementedError, match=r"`momentum` is not supported for sharded"):
        sinkhorn(C, eps=eps, shard_y=True, momentum=1.5)
