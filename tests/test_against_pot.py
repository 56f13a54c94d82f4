"""Oracle: POT's Sinkhorn solvers at convergence (float64, tight tolerances).

POT stops on the L2 norm of one marginal every 10 iterations and ends on a ``u``
update, so the solvers are compared at convergence, not after a fixed count.
"""

import numpy as np
import ot
import pytest
import torch

from sinkhorn_ot import sinkhorn
from sinkhorn_ot.testing import random_problem

TIGHT = {"tol": 1e-14, "max_iter": 100000, "grad": "none"}


def rel_err(x, y):
    return float((x - y).abs().max() / y.abs().max())


def normalise(f, g, a, b):
    """Split the free constant of (f + c, g - c) so that <f, a> = <g, b>."""
    c = ((g * b).sum() - (f * a).sum()) / (2 * a.sum())
    return f + c, g - c


@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_plan_matches_ot_sinkhorn(backend, method, eps):
    C, a, b = random_problem(3, 9, 7, seed=21)
    res = sinkhorn(C, a, b, eps=eps, method=method, backend=backend, **TIGHT)
    for k in range(3):
        P = ot.sinkhorn(a[k], b[k], C[k], eps, numItermax=100000, stopThr=1e-15)
        assert rel_err(res.plan[k], P) <= 1e-8


@pytest.mark.parametrize("eps", [0.01, 0.2])
def test_plan_and_potentials_match_sinkhorn_log(backend, eps):
    C, a, b = random_problem(2, 12, 10, seed=22)
    res = sinkhorn(C, a, b, eps=eps, method="log", backend=backend, **TIGHT)
    for k in range(2):
        P, log = ot.bregman.sinkhorn_log(
            a[k], b[k], C[k], eps, numItermax=100000, stopThr=1e-15, log=True
        )
        assert rel_err(res.plan[k], P) <= 1e-8
        # P = diag(exp(log_u)) K diag(exp(log_v)) and u = a exp(f / eps).
        f = eps * (log["log_u"] - a[k].log())
        g = eps * (log["log_v"] - b[k].log())
        f, g = normalise(f, g, a[k], b[k])
        assert rel_err(res.f[k], f) <= 1e-8
        assert rel_err(res.g[k], g) <= 1e-8


@pytest.mark.parametrize("pot_method", ["log_sinkhorn", "sinkhorn"])
def test_batch_matches_ot_solve_batch(backend, pot_method):
    C, a, b = random_problem(5, 8, 11, seed=23)
    eps = 0.1
    res = sinkhorn(C, a, b, eps=eps, backend=backend, **TIGHT)
    pot = ot.solve_batch(C, eps, a, b, max_iter=100000, tol=1e-15, method=pot_method, reg_type="kl")
    assert rel_err(res.plan, pot.plan) <= 1e-8
    assert torch.allclose(res.value_linear, pot.value_linear, rtol=1e-8)


def test_value_linear_matches_sinkhorn2(backend):
    C, a, b = random_problem(2, 6, 6, seed=24)
    res = sinkhorn(C, a, b, eps=0.1, backend=backend, **TIGHT)
    for k in range(2):
        expected = ot.sinkhorn2(a[k], b[k], C[k], 0.1, numItermax=100000, stopThr=1e-15)
        assert np.isclose(float(res.value_linear[k]), float(expected), rtol=1e-8, atol=0)


def test_padded_problem_matches_pot_on_support(backend):
    C, a, b = random_problem(1, 8, 6, seed=25)
    a[0, [1, 5]] = 0
    b[0, 2] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    res = sinkhorn(C, a, b, eps=0.1, backend=backend, **TIGHT)
    rows, cols = a[0] > 0, b[0] > 0
    P = ot.sinkhorn(
        a[0][rows], b[0][cols], C[0][rows][:, cols], 0.1, numItermax=100000, stopThr=1e-15
    )
    assert rel_err(res.plan[0][rows][:, cols], P) <= 1e-8
