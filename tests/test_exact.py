"""Oracle: exact OT by linear programming (SciPy HiGHS), POT's emd, the Hungarian method."""

import numpy as np
import ot
import pytest
import scipy.optimize
import torch

from sinkhorn_ot import emd, sinkhorn

F64 = torch.float64


def shifted_clouds(n, m, seed):
    """Point clouds one unit apart: the LP optimum is about 1, far from 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=F64)
    y = torch.rand(m, 2, generator=gen, dtype=F64) + torch.tensor([1.0, 0.0], dtype=F64)
    return torch.cdist(x, y) ** 2


@pytest.mark.parametrize(("n", "m", "seed"), [(10, 12, 0), (30, 20, 1), (50, 60, 2)])
def test_small_eps_value_linear_approaches_lp_optimum(n, m, seed):
    C = shifted_clouds(n, m, seed)
    exact = emd(C)
    res = sinkhorn(C, eps=3e-3, eps_scaling=0.8, tol=1e-6, max_iter=100000, grad="none")
    assert res.converged
    assert res.value_linear >= exact.value * (1 - 1e-12)  # the LP is optimal
    assert abs(float(res.value_linear - exact.value)) / float(exact.value) <= 1e-3


def test_emd_matches_pot_emd2_and_is_batched():
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(4, 7, 9, generator=gen, dtype=F64)
    a = torch.rand(4, 7, generator=gen, dtype=F64) + 0.1
    b = torch.rand(4, 9, generator=gen, dtype=F64) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    res = emd(C, a, b)
    for k in range(4):
        expected = ot.emd2(a[k].numpy(), b[k].numpy(), C[k].numpy())
        assert np.isclose(float(res.value[k]), expected, rtol=1e-10)
    assert torch.allclose(res.plan.sum(-1), a, atol=1e-12)
    assert torch.allclose(res.plan.sum(-2), b, atol=1e-12)


def test_emd_duals_are_feasible_and_tight():
    gen = torch.Generator().manual_seed(4)
    C = torch.rand(6, 5, generator=gen, dtype=F64)
    res = emd(C)
    slack = C - res.f[:, None] - res.g[None, :]
    assert slack.min() >= -1e-9
    assert (slack[res.plan > 1e-12].abs() <= 1e-9).all()
    a = torch.full((6,), 1 / 6, dtype=F64)
    b = torch.full((5,), 1 / 5, dtype=F64)
    assert torch.isclose(res.f @ a + res.g @ b, res.value, rtol=1e-9)
    assert torch.isclose(res.f @ a, res.g @ b, rtol=1e-9)


def test_emd_padding_gives_zero_rows_and_finite_duals():
    gen = torch.Generator().manual_seed(5)
    C = torch.rand(5, 4, generator=gen, dtype=F64)
    a = torch.tensor([0.25, 0.0, 0.25, 0.25, 0.25], dtype=F64)
    res = emd(C, a)
    assert (res.plan[1] == 0).all()
    assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    unpadded = emd(C[[0, 2, 3, 4]])
    assert torch.isclose(res.value, unpadded.value, rtol=1e-12)


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_permutation_problem_recovers_linear_sum_assignment(seed):
    n = 12
    gen = torch.Generator().manual_seed(seed)
    C = torch.rand(n, n, generator=gen, dtype=F64)
    rows, cols = scipy.optimize.linear_sum_assignment(C.numpy())
    res = sinkhorn(C, eps=3e-3, eps_scaling=0.8, tol=1e-5, max_iter=100000, grad="none")
    assert res.converged
    assert torch.equal(res.plan.argmax(dim=1), torch.as_tensor(cols))
    assert torch.equal(emd(C).plan.argmax(dim=1), torch.as_tensor(cols))
    assert rows.tolist() == list(range(n))
