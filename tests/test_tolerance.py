"""``tol="auto"``, the default: 1e-5, or the dtype's rounding floor where that is higher.

The oracle of the floor is its formula, ``torch.finfo(dtype).eps * max|C_ij| / eps``
over the real entries, with ``C`` recomputed here in float64 (``torch.cdist``) rather
than taken from the solver.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sinkhorn_ot import PointCloud, SinkhornConvergenceWarning, sinkhorn

F32_EPS = torch.finfo(torch.float32).eps


def clouds(batch=2, n=60, m=70, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, m, 3, generator=gen, dtype=torch.float64) + 1
    return x, y


def half_sq_cost(x, y):
    return torch.cdist(x.double(), y.double()) ** 2 / 2


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_float32_point_clouds_at_small_eps_converge_to_their_rounding_floor(backend):
    # The plan's marginals cannot get below ~1e-4 here in float32 (tests/test_newton.py,
    # the rounding-floor test): the default call must converge without a warning.
    x, y = clouds()
    eps = 0.002
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornConvergenceWarning)
        res = sinkhorn(PointCloud(x.float(), y.float(), scale=0.5), eps=eps, backend=backend)
    scale = half_sq_cost(x.float(), y.float()).amax()
    assert res.tol == pytest.approx(F32_EPS * float(scale) / eps, rel=1e-5)
    assert res.tol > 1e-4
    assert bool(res.converged.all()) and bool((res.err <= res.tol).all())
    # The float64 Newton steps still aim at 1e-5: the plan is at the float32 floor, well
    # inside the resolved tol.
    assert float(res.err.max()) < res.tol / 4, (res.err, res.tol)
    # The returned plan meets it, recomputed in float64.
    plan = res.plan.to_dense().double()
    rows = (plan.sum(-1) - 1 / 60).abs().sum(-1) + (plan.sum(-2) - 1 / 70).abs().sum(-1)
    assert bool((rows <= res.tol).all())
    assert bool((res.n_iter <= 200).all()), res.n_iter


def test_float64_and_moderate_eps_use_exactly_1e_5():
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(3, 20, 25, generator=gen, dtype=torch.float64)
    for cost, eps in ((C, 1e-3), (C.float(), 0.05)):  # float32: floor 0.24e-5 < 1e-5
        auto = sinkhorn(cost, eps=eps)
        fixed = sinkhorn(cost, eps=eps, tol=1e-5)
        assert auto.tol == 1e-5 == fixed.tol
        assert torch.equal(auto.f, fixed.f) and torch.equal(auto.n_iter, fixed.n_iter)


def test_padding_cost_does_not_loosen_the_tolerance():
    # Padded entries often hold a large filler; they are not part of the problem.
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(2, 8, 9, generator=gen)
    a = torch.full((2, 8), 1 / 6)
    a[:, 6:] = 0
    padded = C.clone()
    padded[:, 6:] = 1e6
    res = sinkhorn(padded, a, eps=0.01)
    assert res.tol == pytest.approx(max(1e-5, F32_EPS * float(C[:, :6].amax()) / 0.01))
    assert bool(res.converged.all())


def test_a_centred_cost_gets_the_floor_of_its_centred_frame():
    # rand - 1e4: the solver works on C - c (docs/conventions.md), whose rounding floor
    # at eps = 0.05 is ~1.2e-6: tol stays 1e-5 where max|C| / eps would give 24.
    gen = torch.Generator().manual_seed(5)
    C = torch.rand(2, 10, 11, generator=gen) - 1e4
    res = sinkhorn(C, eps=0.05)
    assert res.tol == 1e-5
    assert bool(res.converged.all())


def test_the_largest_floor_of_a_batch_applies_to_all_its_problems():
    x, y = clouds(batch=2, n=30, m=35)
    eps = torch.tensor([0.5, 0.005], dtype=torch.float32)
    res = sinkhorn(PointCloud(x.float(), y.float(), scale=0.5), eps=eps)
    scale = half_sq_cost(x.float(), y.float()).amax(dim=(1, 2))
    want = float((F32_EPS * scale / eps.double()).max())
    assert res.tol == pytest.approx(want, rel=1e-5) and bool(res.converged.all())


def test_explicit_tolerances_are_kept_and_reported():
    x, y = clouds(batch=1, n=30, m=35)
    cloud = PointCloud(x.float(), y.float(), scale=0.5)
    with pytest.warns(SinkhornConvergenceWarning, match="tol=1e-07"):
        strict = sinkhorn(cloud, eps=0.002, tol=1e-7)
    assert strict.tol == 1e-7 and not bool(strict.converged.any())
    assert sinkhorn(cloud, eps=0.5, tol=1e-3).tol == 1e-3
    assert sinkhorn(cloud, eps=0.5, tol=None, max_iter=3).tol == 1e-5


def test_unbatched_and_numpy_results_carry_the_tolerance():
    C = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    res = sinkhorn(C, eps=0.001)
    assert isinstance(res.tol, float)
    assert res.tol == pytest.approx(max(1e-5, F32_EPS * float(C.max()) / 0.001), rel=1e-6)
    assert bool(res.converged)


@pytest.mark.parametrize("tol", ["Auto", "1e-5", True])
def test_other_values_of_tol_name_the_choices(tol):
    with pytest.raises(TypeError, match=r"`tol` must be a positive float, 'auto' or None"):
        sinkhorn(torch.rand(3, 4), eps=0.1, tol=tol)
