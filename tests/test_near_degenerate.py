"""Near-degenerate problems: plans with entries of 1e-13 and below.

``converged`` certifies the plan (both marginals, float64). The potentials of such a
problem can be ill-conditioned: when the only link between two groups of rows and
columns is a set of tiny plan entries, moving one group's potentials against the other's
by ``delta`` changes the plan by about ``P_small * delta / eps``, below what any
marginal test (or the change of the potentials per iteration) can see. These tests
check what docs/conventions.md promises ("Potentials of near-degenerate problems"):
the swap property on random near-degenerate problems, the closed-form 2 x 2 plan and
value on GeomLoss's symmetry example, and that no run claims convergence it lacks.
"""

import math

import pytest
import torch

from sinkhorn_ot import SinkhornConvergenceWarning, sinkhorn

F64 = torch.float64
EPS = 0.1


def _near_degenerate(seed: int, n: int, m: int):
    """Gaussian costs of spread 3 at eps 0.1: plan entries from 1e-13 down to 1e-60."""
    gen = torch.Generator().manual_seed(seed)
    C = 3 * torch.randn(n, m, generator=gen, dtype=F64)
    a = torch.rand(n, generator=gen, dtype=F64) + 0.2
    b = torch.rand(m, generator=gen, dtype=F64) + 0.2
    return C, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("stop", ["marginals", "potentials"])
@pytest.mark.parametrize("eps_scaling", [None, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(6))
def test_swapping_sides_swaps_potentials_on_near_degenerate_problems(
    seed, eps_scaling, stop, backend
):
    n, m = 2 + seed % 3, 3 + seed % 2
    C, a, b = _near_degenerate(seed, n, m)
    kw = {"eps": EPS, "tol": 1e-8, "max_iter": 20000, "grad": "none", "backend": backend}
    kw["stop"] = stop
    res = sinkhorn(C, a, b, eps_scaling=eps_scaling, **kw)
    swapped = sinkhorn(C.T.contiguous(), b, a, eps_scaling=eps_scaling, **kw)
    assert bool(res.converged) and bool(swapped.converged)
    assert float(res.plan[res.plan > 0].min()) < 1e-12  # the case this test is about
    assert (res.plan - swapped.plan.T).abs().sum() <= 1e-6
    assert (res.f - swapped.g).abs().max() <= 1e-6
    assert (res.g - swapped.f).abs().max() <= 1e-6
    assert abs(float(res.value - swapped.value)) <= 1e-8


def _closed_form_2x2(c: float):
    """Plan and value of ``C = [[0, c], [0, 0]]``, uniform weights, eps = EPS.

    A 2 x 2 plan with uniform marginals is ``[[p, 1/2 - p], [1/2 - p, p]]``, and
    optimality fixes ``P11 P22 / (P12 P21) = exp((C12 + C21 - C11 - C22) / eps)``.
    """
    ratio = math.exp(c / (2 * EPS))  # p / (1/2 - p)
    p = 0.5 * ratio / (1 + ratio)
    plan = torch.tensor([[p, 0.5 - p], [0.5 - p, p]], dtype=F64)
    C = torch.tensor([[0.0, c], [0.0, 0.0]], dtype=F64)
    # value = <C, P> + eps KL(P | a b^T) (plan mass 1: the mass terms cancel)
    value = float((C * plan).sum() + EPS * (plan * (plan / 0.25).log()).sum())
    return C, plan, value


@pytest.mark.parametrize("c", [5.957, -5.957])
def test_geomloss_symmetry_example_plan_and_value_are_exact(c, backend):
    """GeomLoss's ``test_symmetry`` case: its potentials are ill-conditioned (their
    relative offset is set by plan entries of 1e-13), its plan and value are not."""
    C, exact_plan, exact_value = _closed_form_2x2(c)
    uniform = torch.full((2,), 0.5, dtype=F64)
    res = sinkhorn(C, uniform, uniform, eps=EPS, eps_scaling=0.5, grad="none", backend=backend)
    assert bool(res.converged)
    assert (res.plan - exact_plan).abs().max() <= 1e-12
    assert abs(float(res.value) - exact_value) <= 1e-9
    swapped = sinkhorn(C.T, uniform, uniform, eps=EPS, eps_scaling=0.5, grad="none")
    assert (swapped.plan.T - exact_plan).abs().max() <= 1e-12


def test_unannealed_run_on_ill_conditioned_potentials_does_not_claim_convergence(backend):
    """Without annealing the slow mode shows in the marginals (err ~ 1 / (2 T)): plain
    Sinkhorn stops unconverged and says so, rather than returning potentials 1.1 off."""
    C, _, _ = _closed_form_2x2(5.957)
    uniform = torch.full((2,), 0.5, dtype=F64)
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn(C, uniform, uniform, eps=EPS, max_iter=1000, backend=backend,
                       newton=False)  # fmt: skip
    assert not bool(res.converged)
    assert float(res.err) > 1e-5


def test_default_newton_polish_reaches_the_closed_form_without_annealing(backend):
    """The same run with the defaults: the Newton polish takes over from the slow mode
    and lands on the closed-form plan and value."""
    C, exact_plan, exact_value = _closed_form_2x2(5.957)
    uniform = torch.full((2,), 0.5, dtype=F64)
    res = sinkhorn(C, uniform, uniform, eps=EPS, max_iter=1000, grad="none", backend=backend)
    assert bool(res.converged)
    assert (res.plan - exact_plan).abs().max() <= 1e-9
    assert abs(float(res.value) - exact_value) <= 1e-8
