"""Solver behaviour: shapes, stopping, warm start, annealing, padding, precision."""

import pytest
import torch

from sinkhorn_ot import SinkhornConvergenceWarning, pad_batch, sinkhorn
from sinkhorn_ot._loop import eps_schedule
from sinkhorn_ot.testing import random_problem

F64 = torch.float64


def solve(C, a=None, b=None, **kw):
    kw.setdefault("grad", "none")
    return sinkhorn(C, a, b, **kw)


@pytest.mark.parametrize("method", ["log", "kernel"])
def test_marginals_met_and_plan_nonnegative(backend, method):
    C, a, b = random_problem(4, 7, 5, seed=1)
    res = solve(C, a, b, eps=0.1, method=method, tol=1e-10, backend=backend)
    assert res.converged.all()
    assert (res.plan >= 0).all()
    assert torch.allclose(res.plan.sum(-1), a, atol=1e-10)
    assert torch.allclose(res.plan.sum(-2), b, atol=1e-14)  # column marginal is exact
    assert res.backend == backend and res.method == method


def test_unbatched_in_unbatched_out(backend):
    C, a, b = random_problem(1, 6, 4, seed=2)
    single = solve(C[0], a[0], b[0], eps=0.2, backend=backend)
    batched = solve(C, a, b, eps=0.2, backend=backend)
    assert single.plan.shape == (6, 4) and single.f.shape == (6,) and single.g.shape == (4,)
    assert single.value.shape == () and single.n_iter.shape == () and single.converged.shape == ()
    assert torch.equal(single.plan, batched.plan[0])


def test_tol_none_runs_exactly_max_iter(backend):
    C, a, b = random_problem(3, 5, 5, seed=3)
    res = solve(C, a, b, eps=0.5, tol=None, max_iter=7, backend=backend)
    assert res.n_iter.tolist() == [7, 7, 7]
    zero = solve(C, a, b, eps=0.5, tol=None, max_iter=0, backend=backend)
    assert zero.n_iter.tolist() == [0, 0, 0]
    assert torch.isfinite(zero.err).all()


def test_converged_problems_stop_updating(backend):
    # Problem 0 has a large eps (fast), problem 1 a small one (slow).
    C, a, b = random_problem(2, 8, 8, seed=4)
    eps = torch.tensor([1.0, 0.02], dtype=F64)
    res = solve(C, a, b, eps=eps, tol=1e-9, max_iter=5000, backend=backend)
    assert res.n_iter[0] < res.n_iter[1]
    # Solving problem 0 alone with the same iteration budget gives the same answer.
    alone = solve(
        C[:1], a[:1], b[:1], eps=1.0, tol=None, max_iter=int(res.n_iter[0]), backend=backend
    )
    assert torch.allclose(res.plan[0], alone.plan[0], rtol=0, atol=1e-15)
    assert (res.err <= 1e-9).all()


def test_eps_tensor_equals_separate_solves(backend):
    C, a, b = random_problem(3, 6, 7, seed=5)
    eps = torch.tensor([0.05, 0.1, 0.5], dtype=F64)
    res = solve(C, a, b, eps=eps, tol=1e-11, backend=backend)
    for k in range(3):
        single = solve(C[k], a[k], b[k], eps=float(eps[k]), tol=1e-11, backend=backend)
        assert torch.allclose(res.plan[k], single.plan, rtol=1e-12, atol=1e-16)


def test_warm_start_from_solution_converges_immediately(backend):
    C, a, b = random_problem(2, 9, 6, seed=6)
    res = solve(C, a, b, eps=0.05, tol=1e-9, backend=backend)
    again = solve(C, a, b, eps=0.05, tol=1e-9, init=(res.f, res.g), backend=backend)
    assert again.n_iter.tolist() == [0, 0]
    assert torch.allclose(again.plan, res.plan, rtol=1e-12, atol=1e-16)
    # A warm start from a nearby eps needs fewer iterations than a cold start.
    cold = solve(C, a, b, eps=0.04, tol=1e-9, backend=backend)
    warm = solve(C, a, b, eps=0.04, tol=1e-9, init=(res.f, res.g), backend=backend)
    assert (warm.n_iter < cold.n_iter).all()
    assert torch.allclose(warm.plan, cold.plan, atol=1e-9)


def test_eps_scaling_reaches_the_same_solution(backend):
    C, a, b = random_problem(2, 20, 20, seed=7)
    eps = 2e-3
    plain = solve(C, a, b, eps=eps, tol=1e-8, max_iter=100000, backend=backend)
    annealed = solve(C, a, b, eps=eps, tol=1e-8, max_iter=100000, eps_scaling=0.7, backend=backend)
    assert annealed.converged.all() and plain.converged.all()
    assert torch.allclose(annealed.plan, plain.plan, atol=1e-6)


def test_eps_scaling_schedule_starts_at_cost_scale():
    C, _, _ = random_problem(3, 6, 5, seed=70)
    eps = torch.tensor([1e-3, 1e-2, 10.0], dtype=F64)
    eps0, steps = eps_schedule(eps, C, 0.5)
    scale = C.abs().amax((1, 2))
    assert torch.equal(eps0, torch.maximum(scale, eps))
    # Enough halvings to take the largest ratio down to eps.
    ratio = float(scale[0] / eps[0])
    assert 0.5 ** (steps - 1) * ratio > 1 >= 0.5**steps * ratio


def test_potentials_are_normalised(backend):
    C, a, b = random_problem(3, 5, 8, seed=8)
    res = solve(C, a, b, eps=0.1, backend=backend)
    assert torch.allclose((res.f * a).sum(-1), (res.g * b).sum(-1), rtol=1e-12, atol=1e-14)
    assert torch.allclose(res.value, (res.f * a).sum(-1) + (res.g * b).sum(-1))
    assert torch.allclose(res.value_linear, (C * res.plan).sum((1, 2)))


def test_value_is_regularised_primal_objective(backend):
    C, a, b = random_problem(2, 6, 6, seed=9)
    eps = 0.3
    res = solve(C, a, b, eps=eps, tol=1e-12, backend=backend)
    P = res.plan
    kl = (P * (P / (a[:, :, None] * b[:, None, :])).log()).sum((1, 2))
    assert torch.allclose(res.value, (C * P).sum((1, 2)) + eps * kl, rtol=1e-9)


def test_weights_default_to_uniform_with_matching_mass(backend):
    C, _, b = random_problem(2, 4, 3, seed=10)
    b = 3 * b
    res = solve(C, None, b, eps=0.2, tol=1e-12, backend=backend)
    assert torch.allclose(res.plan.sum(-1), torch.full((2, 4), 0.75, dtype=F64), atol=1e-10)
    res = solve(C, eps=0.2, backend=backend)
    assert torch.allclose(res.plan.sum((1, 2)), torch.ones(2, dtype=F64))


def test_zero_weights_give_exactly_zero_rows_and_finite_potentials(backend):
    C, a, b = random_problem(2, 6, 5, seed=11)
    a[:, 2] = 0
    b[:, 4] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    for method in ("log", "kernel"):
        res = solve(C, a, b, eps=0.1, method=method, backend=backend)
        assert (res.plan[:, 2, :] == 0).all() and (res.plan[:, :, 4] == 0).all()
        assert torch.isfinite(res.f).all() and torch.isfinite(res.g).all()


def test_padded_batch_equals_unpadded_problems(backend):
    sizes = [(3, 5), (7, 2), (4, 4)]
    gen = torch.Generator().manual_seed(12)
    Cs = [torch.rand(n, m, generator=gen, dtype=F64) for n, m in sizes]
    C, a, b = pad_batch(Cs)
    res = solve(C, a, b, eps=0.1, tol=1e-11, backend=backend)
    for k, (n, m) in enumerate(sizes):
        single = solve(Cs[k], eps=0.1, tol=1e-11, backend=backend)
        assert torch.allclose(res.plan[k, :n, :m], single.plan, rtol=1e-9, atol=1e-15)
        assert (res.plan[k, n:] == 0).all() and (res.plan[k, :, m:] == 0).all()
        assert torch.allclose(res.f[k, :n], single.f, rtol=1e-8, atol=1e-12)
        assert torch.allclose(res.value[k], single.value, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_tol_reachable(backend, dtype):
    C, a, b = random_problem(8, 64, 48, dtype=dtype, seed=13)
    eps = 0.05 * float(C.median())
    res = solve(C, a, b, eps=eps, backend=backend)
    assert res.converged.all()
    assert res.plan.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    C, a, b = random_problem(2, 5, 6, seed=14)
    res = solve(C.to(dtype), eps=0.2)
    ref = solve(C.to(dtype).float(), eps=0.2)
    assert res.plan.dtype == torch.float32
    assert torch.equal(res.plan, ref.plan)
    # Half-precision weights whose masses differ by rounding are accepted and met.
    res = solve(C.to(dtype), a.to(dtype), b.to(dtype), eps=0.2)
    assert res.converged.all()
    assert torch.allclose(res.plan.sum(-1), a.to(dtype).float(), atol=1e-5)


def test_non_convergence_flags_and_warns_once(backend):
    C, a, b = random_problem(3, 10, 10, seed=15)
    with pytest.warns(SinkhornConvergenceWarning, match="did not reach tol") as record:
        res = solve(C, a, b, eps=1e-3, max_iter=3, backend=backend)
    assert len(record) == 1
    assert not res.converged.any()
    assert (res.err > 1e-5).all()


def test_auto_picks_kernel_when_safe_and_log_otherwise():
    C, a, b = random_problem(2, 5, 5, seed=16)
    assert solve(C, a, b, eps=1.0, method="auto").method == "kernel"
    small = solve(C, a, b, eps=1e-3, method="auto", max_iter=20000)
    assert small.method == "log" and small.converged.all()


def test_shift_invariance_of_plan(backend):
    C, a, b = random_problem(2, 6, 5, seed=17)
    res = solve(C, a, b, eps=0.1, tol=1e-12, backend=backend)
    shifted = solve(C + 3.0, a, b, eps=0.1, tol=1e-12, backend=backend)
    assert torch.allclose(res.plan, shifted.plan, rtol=1e-9, atol=1e-15)
    # The constant splits evenly between the normalised potentials.
    assert torch.allclose(shifted.f, res.f + 1.5, atol=1e-9)
    assert torch.allclose(shifted.g, res.g + 1.5, atol=1e-9)


def test_swapping_sides_swaps_potentials(backend):
    C, a, b = random_problem(2, 6, 4, seed=18)
    res = solve(C, a, b, eps=0.1, tol=1e-12, backend=backend)
    swapped = solve(C.transpose(1, 2), b, a, eps=0.1, tol=1e-12, backend=backend)
    assert torch.allclose(swapped.plan, res.plan.transpose(1, 2), atol=1e-12)
    assert torch.allclose(swapped.f, res.g, atol=1e-9)
    assert torch.allclose(swapped.g, res.f, atol=1e-9)
    assert torch.allclose(swapped.value, res.value, rtol=1e-10)


def test_non_contiguous_and_expanded_inputs(backend):
    C, a, b = random_problem(3, 5, 6, seed=19)
    Ct = C.transpose(1, 2).contiguous().transpose(1, 2)
    assert not Ct.is_contiguous()
    res = solve(Ct, a, b, eps=0.2, backend=backend)
    ref = solve(C, a, b, eps=0.2, backend=backend)
    assert torch.allclose(res.plan, ref.plan, rtol=1e-13, atol=0)
    expanded = solve(
        C[:1].expand(3, 5, 6), a[:1].expand(3, 5), b[:1].expand(3, 6), eps=0.2, backend=backend
    )
    assert torch.allclose(expanded.plan[2], ref.plan[0], rtol=1e-13, atol=0)


def test_padded_rows_with_tiny_eps_do_not_poison_the_stopping_test(backend):
    # A padded row's ratio can overflow at small eps; it carries no mass.
    gen = torch.Generator().manual_seed(40)
    Cs = [
        torch.rand(5, 6, generator=gen, dtype=F64) * 3,
        torch.rand(3, 4, generator=gen, dtype=F64) * 3,
    ]
    C, a, b = pad_batch(Cs)
    res = solve(C, a, b, eps=0.002, max_iter=20000, backend=backend)
    assert res.converged.all() and torch.isfinite(res.err).all()
