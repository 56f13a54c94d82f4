"""The Newton polish: ``sinkhorn(..., newton="auto" | True | False)``.

Oracles: POT's log-domain Sinkhorn run far below the tolerance (the fixed point does
not depend on the path), the plan's own marginals (``err`` and ``converged`` must
describe the returned plan), Danskin's theorem (the gradient of ``value`` with respect
to ``C`` is the plan), the unpadded problems for padded ones, and plain Sinkhorn
(``newton=False``) for what the polish must leave alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch

from sinkhorn_ot import PointCloud, native, sinkhorn
from sinkhorn_ot._newton import NEWTON_PATIENCE, NEWTON_START, polish
from sinkhorn_ot._polish import NEWTON_WORTH, RATE_WINDOW
from sinkhorn_ot.errors import SinkhornConvergenceWarning

F64 = torch.float64


def hard_clouds(batch=2, n=60, m=70, seed=1, dtype=F64):
    """Gaussian clouds a unit apart in 3-D: at eps = 0.01 (cost |x - y|^2 / 2) plain
    Sinkhorn needs about 2 000 iterations to the default tol, beyond max_iter=1000."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=gen, dtype=F64)
    y = torch.randn(batch, m, 3, generator=gen, dtype=F64) + 1
    return x.to(dtype), y.to(dtype)


def half_sqeuclidean(x, y):
    return 0.5 * ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)


def plan_violation(plan, a, b):
    rows = (plan.sum(-1) - a).abs().sum(-1)
    cols = (plan.sum(-2) - b).abs().sum(-1)
    return (rows + cols) / a.sum(-1)


def pot_plan(C, eps):
    a = np.full(C.shape[0], 1 / C.shape[0])
    b = np.full(C.shape[1], 1 / C.shape[1])
    return ot.sinkhorn(a, b, C.numpy(), eps, method="sinkhorn_log", numItermax=200000,
                       stopThr=1e-12)  # fmt: skip


backends = pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("native", marks=pytest.mark.skipif(
        not native.availability("cpu", F64)[0], reason="native CPU library unavailable"))],
)  # fmt: skip


@backends
def test_default_call_converges_where_plain_sinkhorn_does_not(backend):
    x, y = hard_clouds()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornConvergenceWarning)
        res = sinkhorn(PointCloud(x, y, scale=0.5), eps=0.01, backend=backend)
    assert bool(res.converged.all()) and bool((res.n_iter <= 1000).all()), res.n_iter
    with pytest.warns(SinkhornConvergenceWarning):
        plain = sinkhorn(PointCloud(x, y, scale=0.5), eps=0.01, backend=backend, newton=False)
    assert not bool(plain.converged.any())
    C = half_sqeuclidean(x, y)
    for k in range(C.shape[0]):
        want = torch.from_numpy(pot_plan(C[k], 0.01))
        assert float((res.plan.to_dense()[k] - want).abs().sum()) <= 2e-5


@backends
def test_err_and_converged_describe_the_returned_plan(backend):
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    res = sinkhorn(C, eps=0.01, backend=backend, tol=1e-8, max_iter=2000)
    a, b = torch.full((2, 60), 1 / 60, dtype=F64), torch.full((2, 70), 1 / 70, dtype=F64)
    violation = plan_violation(res.plan, a, b)
    assert torch.allclose(res.err, violation, rtol=1e-6, atol=1e-15)
    assert bool(res.converged.all()) and bool((violation <= 1e-8).all())


def test_problems_converging_within_the_patience_are_untouched():
    x, y = hard_clouds(seed=3)
    C = half_sqeuclidean(x, y)
    auto = sinkhorn(C, eps=1.0, backend="torch")
    plain = sinkhorn(C, eps=1.0, backend="torch", newton=False)
    assert bool((auto.n_iter < NEWTON_PATIENCE).all())
    assert torch.equal(auto.f, plain.f) and torch.equal(auto.g, plain.g)
    assert torch.equal(auto.n_iter, plain.n_iter)


def test_problems_the_rate_calls_quick_continue_as_plain_sinkhorn():
    # 150-350 plain iterations: past the patience, but the rate predicts fewer than
    # NEWTON_WORTH more, so they continue the loop exactly as newton=False runs it.
    C = torch.rand(6, 20, 25, generator=torch.Generator().manual_seed(0), dtype=F64)
    auto = sinkhorn(C, eps=0.01, backend="torch", max_iter=5000)
    plain = sinkhorn(C, eps=0.01, backend="torch", max_iter=5000, newton=False)
    assert bool((plain.n_iter > NEWTON_PATIENCE + RATE_WINDOW).all())
    assert bool((plain.n_iter < NEWTON_PATIENCE + RATE_WINDOW + NEWTON_WORTH).all())
    assert torch.equal(auto.f, plain.f) and torch.equal(auto.g, plain.g)
    assert torch.equal(auto.n_iter, plain.n_iter)


def test_a_misjudged_rate_is_polished_after_the_continuation():
    C = torch.rand(6, 20, 25, generator=torch.Generator().manual_seed(0), dtype=F64)
    auto = sinkhorn(C, eps=0.005, backend="torch", max_iter=5000)
    plain = sinkhorn(C, eps=0.005, backend="torch", max_iter=5000, newton=False)
    # Problem 1 needs 1 611 plain iterations although its early rate predicted fewer
    # than NEWTON_WORTH: it is polished once the continuation has run out.
    continuation = NEWTON_PATIENCE + RATE_WINDOW + NEWTON_WORTH
    assert int(plain.n_iter[1]) > continuation
    assert int(auto.n_iter[1]) < int(plain.n_iter[1])
    assert bool(auto.converged.all())
    assert float((auto.plan - plain.plan).abs().sum((1, 2)).max()) <= 1e-4
    # Those plain Sinkhorn finishes within the continuation are untouched.
    within = plain.n_iter <= continuation
    assert bool(within.any()) and bool((~within).sum() >= 2)
    assert torch.equal(auto.f[within], plain.f[within])
    assert torch.equal(auto.n_iter[within], plain.n_iter[within])


@pytest.mark.skipif(not native.availability("cpu", F64)[0], reason="native CPU library unavailable")
def test_backends_agree():
    x, y = hard_clouds()
    native_res = sinkhorn(PointCloud(x, y, scale=0.5), eps=0.01, backend="native")
    torch_res = sinkhorn(PointCloud(x, y, scale=0.5), eps=0.01, backend="torch")
    assert torch.equal(native_res.n_iter, torch_res.n_iter)
    assert torch.allclose(native_res.f, torch_res.f, atol=1e-9)
    assert torch.allclose(native_res.g, torch_res.g, atol=1e-9)


def test_padded_problems_match_the_unpadded_ones():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    # Pad problem 0 with 10 rows and 5 columns of zero weight and absurd cost.
    Cp = torch.full((2, 70, 75), 1e3, dtype=F64)
    Cp[:, :60, :70] = C
    a = torch.zeros(2, 70, dtype=F64)
    b = torch.zeros(2, 75, dtype=F64)
    a[:, :60], b[:, :70] = 1 / 60, 1 / 70
    # Tight tol: the two take different paths (the padding's cost raises max|C|, where
    # the polish's annealing starts), so they agree to what tol allows.
    padded = sinkhorn(Cp, a, b, eps=0.01, backend="torch", tol=1e-10, max_iter=5000)
    alone = sinkhorn(C, eps=0.01, backend="torch", tol=1e-10, max_iter=5000)
    assert bool(padded.converged.all())
    assert bool(torch.isfinite(padded.f).all() & torch.isfinite(padded.g).all())
    assert (
        float(padded.plan[:, 60:].abs().max()) == 0
        and float(padded.plan[:, :, 70:].abs().max()) == 0
    )
    assert torch.allclose(padded.plan[:, :60, :70], alone.plan, atol=1e-10)
    assert torch.allclose(padded.value, alone.value, rtol=1e-9)


def test_value_gradient_is_the_plan_after_the_polish():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y).requires_grad_(True)
    res = sinkhorn(C, eps=0.01, backend="torch", tol=1e-9, max_iter=2000)
    assert bool((res.n_iter > NEWTON_PATIENCE).all())  # the polish ran
    (grad,) = torch.autograd.grad(res.value.sum(), C)
    assert torch.allclose(grad, res.plan.detach(), atol=1e-9)


def test_float32_inputs_polish_in_float64_and_come_back_float32():
    x, y = hard_clouds(dtype=torch.float32)
    clouds = PointCloud(x, y, scale=0.5)
    res = sinkhorn(clouds, eps=0.01, backend="torch", tol=1e-4)
    plain = sinkhorn(clouds, eps=0.01, backend="torch", tol=1e-4, newton=False, max_iter=20000)
    assert res.f.dtype == torch.float32 and bool(res.converged.all())
    assert bool((res.n_iter < plain.n_iter).all()), (res.n_iter, plain.n_iter)
    C = half_sqeuclidean(x.double(), y.double())
    for k in range(2):  # as close to the float64 fixed point as tol allows (L1 <= tol)
        want = torch.from_numpy(pot_plan(C[k], 0.01))
        assert float((res.plan.to_dense()[k].double() - want).abs().sum()) <= 1e-4


def test_max_iter_bounds_every_stage_and_unconverged_is_reported():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn(C, eps=0.002, backend="torch", max_iter=100)
    assert bool((res.n_iter <= 100).all())
    a, b = torch.full((2, 60), 1 / 60, dtype=F64), torch.full((2, 70), 1 / 70, dtype=F64)
    assert torch.allclose(res.err, plan_violation(res.plan, a, b), rtol=1e-6)
    assert not bool(res.converged.any()) and bool((res.err > 1e-5).all())


def test_newton_true_polishes_without_waiting():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    res = sinkhorn(C, eps=0.01, backend="torch", newton=True, tol=1e-9)
    auto = sinkhorn(C, eps=0.01, backend="torch", tol=1e-9)
    assert bool(res.converged.all()) and bool((res.n_iter < auto.n_iter).all())
    for k in range(2):
        want = torch.from_numpy(pot_plan(C[k], 0.01))
        assert float((res.plan[k] - want).abs().sum()) <= 1e-8


def test_tiny_weights_give_no_nan():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    a = torch.full((2, 60), 1.0, dtype=F64)
    a[:, :5] = 1e-30
    a = a / a.sum(-1, keepdim=True)
    res = sinkhorn(C, a, eps=0.01, backend="torch")
    for t in (res.f, res.g, res.plan, res.value):
        assert bool(torch.isfinite(t).all())
    b = torch.full((2, 70), 1 / 70, dtype=F64)
    assert torch.allclose(res.err, plan_violation(res.plan, a, b), rtol=1e-6)
    assert bool(res.converged.all())


def test_polish_converges_fast_near_the_fixed_point():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    eps = torch.full((2,), 0.01, dtype=F64)
    start = sinkhorn(C, eps=0.01, tol=NEWTON_START, newton=False, backend="torch", max_iter=5000)
    a, b = torch.full((2, 60), 1 / 60, dtype=F64), torch.full((2, 70), 1 / 70, dtype=F64)
    f, steps, err = polish(C, a, b, eps, start.f, 1e-10, torch.full((2,), 50))
    assert bool((err <= 1e-10).all()) and bool((steps <= 20).all()), (steps, err)
    # Its own err is that of (f, col(f)): the plan of sinkhorn(init=f) at zero iterations.
    res = sinkhorn(C, eps=0.01, init=(f, torch.zeros(2, 70, dtype=F64)), max_iter=0,
                   tol=None, backend="torch")  # fmt: skip
    assert torch.allclose(res.err, err, rtol=1e-2, atol=1e-12)


def test_polish_respects_its_budget():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y)
    a, b = torch.full((2, 60), 1 / 60, dtype=F64), torch.full((2, 70), 1 / 70, dtype=F64)
    f0 = torch.zeros(2, 60, dtype=F64)
    _, steps, err = polish(C, a, b, torch.full((2,), 0.002, dtype=F64), f0, 1e-12,
                           torch.tensor([0, 3]))  # fmt: skip
    assert steps.tolist() == [0, 3]
    assert bool(torch.isfinite(err).all())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tol": None}, "tol=None"),
        ({"rho_a": 1.0}, "relaxed"),
        ({"stop": "potentials"}, "potentials"),
        ({"grad": "unroll", "backend": "torch"}, "unroll"),
    ],
)
def test_newton_true_where_it_cannot_run_raises(settings, message):
    C = torch.rand(1, 5, 6, dtype=F64)
    with pytest.raises(ValueError, match=f"`newton=True`.*{message}"):
        sinkhorn(C, eps=0.1, newton=True, **settings)


def test_newton_auto_steps_aside_where_it_cannot_run():
    x, y = hard_clouds()
    C = half_sqeuclidean(x, y).requires_grad_(True)
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn(C, eps=0.01, backend="torch", grad="unroll", max_iter=200)
    assert bool((res.n_iter == 200).all())  # plain iterations, not polished


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_newton_values_are_rejected(bad):
    with pytest.raises(ValueError, match="`newton` must be 'auto', True or False"):
        sinkhorn(torch.rand(4, 5), eps=0.1, newton=bad)


def test_sharded_solves_reject_newton_true():
    with pytest.raises(NotImplementedError, match="`newton=True`"):
        sinkhorn(torch.rand(4, 5), eps=0.1, group=object(), newton=True)


def test_float32_at_its_rounding_floor_does_not_spend_the_budget():
    # At eps = 0.002 float32 potentials of size ~10 round to ~4e-4 of eps: the plan's
    # marginals cannot get below ~1e-4, so tol=1e-5 is out of reach whatever the budget.
    x, y = hard_clouds(dtype=torch.float32)
    clouds = PointCloud(x, y, scale=0.5)
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn(clouds, eps=0.002, backend="torch", tol=1e-5)
    with pytest.warns(SinkhornConvergenceWarning):
        longer = sinkhorn(clouds, eps=0.002, backend="torch", max_iter=5000, tol=1e-5)
    assert bool((res.err > 1e-5).all()) and not bool(res.converged.any())
    assert bool((longer.err > 0.5 * res.err).all()), (longer.err, res.err)  # the floor
    assert bool((res.n_iter < 500).all()), res.n_iter  # not 1000: the rounds stopped
