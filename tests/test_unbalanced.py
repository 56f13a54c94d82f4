"""Unbalanced and semi-relaxed OT (``rho_a``, ``rho_b``): against POT, closed forms and
finite differences, on every backend and geometry available on the CPU."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from sinkhorn_ot import PointCloud, SinkhornConvergenceWarning, native, sinkhorn, sqeuclidean
from sinkhorn_ot import autograd as autograd_dense

INF = math.inf
BACKENDS = ["torch"] + (["native"] if native.availability("cpu", torch.float64)[0] else [])
F64 = torch.float64


def problem(B=2, N=6, M=5, seed=0, mass_b=1.0):
    gen = torch.Generator().manual_seed(seed)
    C = torch.rand(B, N, M, generator=gen, dtype=F64)
    a = torch.rand(B, N, generator=gen, dtype=F64) + 0.2
    b = torch.rand(B, M, generator=gen, dtype=F64) + 0.2
    a, b = a / a.sum(-1, keepdim=True), mass_b * b / b.sum(-1, keepdim=True)
    return C, a, b


def kl(p, q):
    """Generalised KL, summed over the last dimensions, in float64 NumPy."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    inside = np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / np.where(q > 0, q, 1)), 0.0)
    return float((inside - p + q).sum())


def primal(C, P, a, b, eps, rho_a, rho_b):
    """``<C, P> + eps KL(P | a b^T) + rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)``."""
    value = float((C * P).sum()) + eps * kl(P, np.outer(a, b))
    if math.isfinite(rho_a):
        value += rho_a * kl(P.sum(1), a)
    if math.isfinite(rho_b):
        value += rho_b * kl(P.sum(0), b)
    return value


def pot_plan(C, a, b, eps, rho_a, rho_b):
    reg_m = (rho_a, rho_b)
    return ot.unbalanced.sinkhorn_unbalanced(
        a, b, C, eps, reg_m, reg_type="kl", numItermax=200_000, stopThr=1e-15
    )


# --------------------------------------------------------------------------------------
# Against POT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize(("rho_a", "rho_b"), [(0.7, 2.0), (INF, 1.5), (0.5, INF)])
def test_plans_and_values_match_pot(backend, method, rho_a, rho_b):
    C, a, b = problem(mass_b=3.0)
    eps = 0.1
    res = sinkhorn(
        C, a, b, eps=eps, rho_a=rho_a, rho_b=rho_b, tol=1e-13, max_iter=20_000,
        method=method, backend=backend,
    )  # fmt: skip
    assert bool(res.converged.all())
    for k in range(C.shape[0]):
        Ck, ak, bk = C[k].numpy(), a[k].numpy(), b[k].numpy()
        P = pot_plan(Ck, ak, bk, eps, rho_a, rho_b)
        rel = np.abs(res.plan[k].numpy() - P).max() / np.abs(P).max()
        assert rel <= 1e-8, rel
        # value: the full objective; POT's linear + entropic + marginal terms lack the
        # constant mass terms, which we add back.
        expected = primal(Ck, P, ak, bk, eps, rho_a, rho_b)
        assert float(res.value[k]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        pot_loss = float((Ck * P).sum()) + eps * float((P * np.log(P / np.outer(ak, bk))).sum())
        missing = eps * (ak.sum() * bk.sum() - P.sum())
        for rho, marg, w in ((rho_a, P.sum(1), ak), (rho_b, P.sum(0), bk)):
            if math.isfinite(rho):
                pot_loss += rho * float((marg * np.log(marg / w)).sum())
                missing += rho * (w.sum() - marg.sum())
        assert float(res.value[k]) == pytest.approx(pot_loss + missing, rel=1e-9)
        assert float(res.value_linear[k]) == pytest.approx(float((Ck * P).sum()), rel=1e-8)


def test_semi_relaxed_meets_its_hard_marginal_and_potentials_are_not_normalised():
    C, a, b = problem(mass_b=3.0)
    tol = 1e-7
    res = sinkhorn(C, a, b, eps=0.05, rho_b=0.5, tol=tol, backend="torch")
    assert bool(res.converged.all())
    rows = res.plan.sum(2)
    assert float(((rows - a).abs().sum(-1) / a.sum(-1)).max()) <= tol
    # The relaxed side is not matched (b has mass 3): the plan's mass lies in between.
    assert bool((res.plan.sum((1, 2)) < b.sum(-1) - 0.5).all())
    # Not normalised: <f, a> = <g, b> would be a coincidence.
    assert not torch.allclose((res.f * a).sum(-1), (res.g * b).sum(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_rho_recovers_balanced(backend):
    C, a, b = problem()
    kw = {"eps": 0.1, "tol": 1e-11, "max_iter": 50_000, "backend": backend}
    balanced = sinkhorn(C, a, b, **kw)
    # The plan and value approach the balanced ones as O(eps / rho). (The constant mode
    # (f + c, g - c) contracts only by 1 - 2 eps / rho per iteration: start from the
    # balanced potentials, whose normalisation <f, a> = <g, b> is the limit's.)
    gaps = []
    for rho in (1e2, 1e3):
        relaxed = sinkhorn(C, a, b, rho_a=rho, rho_b=rho, init=(balanced.f, balanced.g), **kw)
        assert bool(relaxed.converged.all())
        gaps.append(float((relaxed.plan - balanced.plan).abs().max()))
        assert torch.allclose(relaxed.value, balanced.value, atol=10 / rho)
    assert gaps[1] < 0.2 * gaps[0] and gaps[1] < 1e-3
    hard = sinkhorn(C, a, b, rho_a=INF, rho_b=None, **kw)  # inf = None: bit for bit balanced
    assert torch.equal(hard.plan, balanced.plan) and torch.equal(hard.f, balanced.f)


def test_unequal_masses_give_finite_sensible_plans():
    C, a, b = problem(mass_b=3.0)
    res = sinkhorn(C, a, b, eps=0.05, rho_a=1.0, rho_b=1.0, backend="torch")
    mass = res.plan.sum((1, 2))
    assert bool(torch.isfinite(res.plan).all()) and bool(res.converged.all())
    assert bool(((mass > 1.0) & (mass < 3.0)).all())  # between the two masses
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn(C, a, b, eps=0.05)  # balanced problems still need equal masses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["log", "kernel"])
def test_zero_weights_give_exact_zeros_and_match_unpadded(backend, method):
    C, a, b = problem(B=1, N=6, M=5, seed=3, mass_b=2.0)
    kw = {"eps": 0.1, "rho_a": 0.8, "rho_b": 1.2, "tol": 1e-12, "method": method}
    small = sinkhorn(C[:, :4, :3], a[:, :4], b[:, :3], backend=backend, **kw)
    a_pad, b_pad = a.clone(), b.clone()
    a_pad[:, 4:], b_pad[:, 3:] = 0, 0
    padded = sinkhorn(C, a_pad, b_pad, backend=backend, **kw)
    assert bool((padded.plan[:, 4:] == 0).all()) and bool((padded.plan[:, :, 3:] == 0).all())
    assert torch.allclose(padded.plan[:, :4, :3], small.plan, rtol=1e-10, atol=1e-14)
    assert torch.allclose(padded.value, small.value, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_cloud_matches_dense_cost(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 3, generator=gen, dtype=F64)
    y = torch.randn(2, 20, 3, generator=gen, dtype=F64) + 1.0
    kw = {"eps": 0.5, "rho_a": 1.0, "rho_b": 2.0, "tol": 1e-11, "backend": backend}
    lazy = sinkhorn(PointCloud(x, y), **kw)
    dense = sinkhorn(sqeuclidean(x, y), **kw)
    assert torch.allclose(lazy.plan.to_dense(), dense.plan, rtol=1e-9, atol=1e-14)
    assert torch.allclose(lazy.value, dense.value, rtol=1e-10)
    assert torch.allclose(lazy.f, dense.f, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_eps_scaling_and_warm_start(backend):
    """(B,) rho with hard entries: each problem as if solved alone; annealing and warm
    starts reach the same solution."""
    C, a, b = problem(B=3, seed=4)
    rho_b = torch.tensor([0.5, INF, 2.0], dtype=F64)
    kw = {"eps": 0.05, "tol": 1e-10, "max_iter": 20_000, "backend": backend}
    batch = sinkhorn(C, a, b, rho_b=rho_b, **kw)
    for k in range(3):
        alone = sinkhorn(C[k], a[k], b[k], rho_b=float(rho_b[k]), **kw)
        assert torch.allclose(batch.plan[k], alone.plan, rtol=1e-9, atol=1e-14)
        assert torch.allclose(batch.value[k], alone.value, rtol=1e-10)
    annealed = sinkhorn(C, a, b, rho_b=rho_b, eps_scaling=0.5, **kw)
    assert torch.allclose(annealed.plan, batch.plan, atol=1e-8)
    warm = sinkhorn(C, a, b, rho_b=rho_b, init=(batch.f, batch.g), **kw)
    assert torch.allclose(warm.plan, batch.plan, atol=1e-9)
    assert bool((warm.n_iter <= 2).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_potentials_rule_for_balanced_problems(backend):
    """stop="potentials" on a balanced problem: err is at least the marginal violation
    and the solution is the balanced one."""
    C, a, b = problem(seed=5)
    kw = {"eps": 0.05, "tol": 1e-9, "max_iter": 20_000, "backend": backend}
    plain = sinkhorn(C, a, b, **kw)
    rule = sinkhorn(C, a, b, stop="potentials", **kw)
    violation = (rule.plan.sum(2) - a).abs().sum(-1) + (rule.plan.sum(1) - b).abs().sum(-1)
    assert bool((rule.err >= violation - 1e-15).all()) and bool(rule.converged.all())
    assert torch.allclose(rule.plan, plain.plan, atol=1e-8)
    with pytest.raises(ValueError, match="stop"):
        sinkhorn(C, a, b, rho_a=1.0, stop="marginals", **kw)


def test_unconverged_relaxed_problem_is_reported():
    C, a, b = problem()
    with pytest.warns(SinkhornConvergenceWarning):
        res = sinkhorn(C, a, b, eps=0.01, rho_a=5.0, rho_b=5.0, max_iter=3, backend="torch")
    assert not bool(res.converged.any()) and bool((res.err > 1e-5).all())


# --------------------------------------------------------------------------------------
# Gradients


def _losses(W):
    def value(res):
        return res.value.sum()

    def mixed(res):
        plan = res.plan if isinstance(res.plan, torch.Tensor) else res.plan.to_dense()
        return res.value.sum() + (W * plan).sum() + (res.f[:, :2] ** 2).sum() + res.g.sum()

    return value, mixed


def _check_fd(run, inputs, loss, fixed_dirs=None, h=1e-6, rtol=1e-6):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(loss(run(*leaves)), leaves, allow_unused=True)
    gen = torch.Generator().manual_seed(7)
    for k, (t, grad) in enumerate(zip(inputs, grads)):
        direction = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if fixed_dirs is not None and k in fixed_dirs:
            direction = direction * fixed_dirs[k]
        plus = [x.clone() for x in inputs]
        minus = [x.clone() for x in inputs]
        plus[k], minus[k] = t + h * direction, t - h * direction
        with torch.no_grad():
            fd = (loss(run(*plus, grad="none")) - loss(run(*minus, grad="none"))) / (2 * h)
        analytic = (grad * direction).sum() if grad is not None else torch.zeros(())
        assert float(analytic) == pytest.approx(float(fd), rel=rtol, abs=rtol), k


@pytest.mark.parametrize("grad", ["implicit", "envelope", "unroll"])
def test_dense_gradients_match_finite_differences(grad):
    C, a, b = problem(B=2, N=5, M=4, mass_b=2.0)
    a[1, -1] = 0  # padding
    eps = torch.tensor([0.2, 0.3], dtype=F64)
    rho_a = torch.tensor([0.7, INF], dtype=F64)  # problem 1: semi-relaxed
    rho_b = torch.tensor([1.5, 2.0], dtype=F64)
    W = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    value, mixed = _losses(W)

    def run(C, a, b, eps, rho_a, rho_b, grad=grad):
        return sinkhorn(
            C, a, b, eps=eps, rho_a=rho_a, rho_b=rho_b, tol=1e-13, max_iter=20_000,
            grad=grad, backend="torch",
        )  # fmt: skip

    keep_a = torch.ones(2, 5, dtype=F64)
    keep_a[1, -1] = 0
    dirs = {1: keep_a, 4: torch.tensor([1.0, 0.0], dtype=F64)}
    loss = value if grad == "envelope" else mixed
    _check_fd(run, [C, a, b, eps, rho_a, rho_b], loss, dirs)


def test_dense_implicit_conjugate_gradient_path(monkeypatch):
    """Above DENSE_MAX the adjoint runs CG on the Schur complement (no projection for
    relaxed problems): the same gradients as the dense factorisation."""
    C, a, b = problem(B=2, N=7, M=5, mass_b=2.0)
    rho_b = torch.tensor([0.8, INF], dtype=F64)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
        res = sinkhorn(*leaves, eps=0.2, rho_a=0.6, rho_b=rho_b, tol=1e-13, backend="torch")
        return torch.autograd.grad((res.f**2).sum() + res.value.sum(), leaves)

    dense = grads()
    monkeypatch.setattr(autograd_dense, "DENSE_MAX", 2)
    import sinkhorn_ot.autograd_unbalanced as relaxed

    monkeypatch.setattr(relaxed, "DENSE_MAX", 2)
    iterative = grads()
    for x, y in zip(dense, iterative):
        assert torch.allclose(x, y, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("grad", ["implicit", "envelope"])
def test_point_cloud_gradients_match_finite_differences(grad):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 2, generator=gen, dtype=F64)
    y = torch.randn(2, 5, 2, generator=gen, dtype=F64)
    a = torch.rand(2, 6, generator=gen, dtype=F64) + 0.2
    b = torch.rand(2, 5, generator=gen, dtype=F64) + 0.2
    rho_a = torch.tensor([1.0, INF], dtype=F64)
    W = torch.randn(2, 6, 5, generator=gen, dtype=F64)
    value, mixed = _losses(W)

    def run(x, y, a, b, rho_a, grad=grad):
        return sinkhorn(
            PointCloud(x, y), a, b, eps=0.5, rho_a=rho_a, rho_b=2.0, tol=1e-13,
            max_iter=20_000, grad=grad, backend="torch",
        )  # fmt: skip

    loss = value if grad == "envelope" else mixed
    _check_fd(run, [x, y, a, b, rho_a], loss, {4: torch.tensor([1.0, 0.0], dtype=F64)})


def test_implicit_matches_unroll_at_convergence():
    C, a, b = problem(B=2, N=5, M=6, mass_b=2.0)
    W = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=F64)

    def grads(grad):
        leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
        res = sinkhorn(
            *leaves, eps=0.2, rho_a=0.5, rho_b=INF, tol=1e-14, max_iter=5_000, grad=grad,
            backend="torch",
        )  # fmt: skip
        loss = (W * res.plan).sum() + res.value.sum() + (res.g**2).sum()
        return torch.autograd.grad(loss, leaves)

    for x, y in zip(grads("implicit"), grads("unroll")):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho_a": 0.0}, ValueError, "`rho_a` must be > 0"),
        ({"rho_b": -1.0}, ValueError, "`rho_b` must be > 0"),
        ({"rho_a": float("nan")}, ValueError, "`rho_a` must be > 0"),
        ({"rho_b": torch.tensor([1.0, float("nan")], dtype=F64)}, ValueError, "`rho_b`"),
        ({"rho_a": torch.ones(3, dtype=F64)}, ValueError, r"`rho_a` must be \(B,\) = \(2,\)"),
        ({"rho_b": torch.ones(2, dtype=torch.int64)}, TypeError, "`rho_b` must be a floating"),
        ({"rho_a": "1"}, TypeError, "`rho_a` must be None"),
        ({"rho_a": True}, TypeError, "`rho_a`"),
        ({"stop": "sometimes"}, ValueError, "`stop` must be one of"),
    ],
)
def test_bad_relaxation_is_a_clear_error(kwargs, error, match):
    C, a, b = problem()
    with pytest.raises(error, match=match):
        sinkhorn(C, a, b, eps=0.1, **kwargs)


def test_outlier_example_runs_small(tmp_path):
    """examples/unbalanced_outliers.py at a small size: balanced OT sends each outlier
    its column mass, unbalanced OT almost nothing; the figure is written."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "unbalanced_outliers.py"
    main = runpy.run_path(str(script))["main"]
    out = tmp_path / "outliers.png"
    sent = main(["--n", "40", "--outliers", "4", "--out", str(out)])
    assert sent["balanced"] == pytest.approx(4 / 44, rel=1e-4)
    assert sent["unbalanced"] < 0.2 * sent["balanced"]
    pytest.importorskip("matplotlib")
    assert out.stat().st_size > 0


@pytest.mark.skipif("native" not in BACKENDS, reason="native-cpu unavailable")
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("geometry", ["dense", "points"])
def test_native_loop_matches_torch_loop(geometry, method):
    """The loop contract with a relaxation: same iterates, n_iter and err on a batch that
    mixes relaxed, semi-relaxed and balanced problems, with padding and annealing."""
    from sinkhorn_ot import ops
    from sinkhorn_ot._loop import eps_table, solve
    from sinkhorn_ot.geometry import DenseCost

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 2, generator=gen, dtype=F64)
    y = torch.randn(3, 7, 2, generator=gen, dtype=F64)
    a = torch.rand(3, 9, generator=gen, dtype=F64) + 0.2
    b = torch.rand(3, 7, generator=gen, dtype=F64) + 0.2
    a[:, -2:], b[:, -1] = 0, 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    rho = torch.tensor([[0.5, 2.0], [INF, 1.0], [INF, INF]], dtype=F64)
    eps = torch.tensor([0.3, 0.2, 0.25], dtype=F64)
    C = sqeuclidean(x, y)
    table = eps_table(eps, C.abs().amax((1, 2)), 0.7)
    f0 = torch.zeros_like(a)
    kw = {"max_iter": 300, "tol": 1e-10, "method": method}
    for stop in ("marginals", "potentials"):
        potentials = torch.isfinite(rho).any(-1) | (stop == "potentials")
        geo = DenseCost(C) if geometry == "dense" else PointCloud(x, y)
        ref = solve(geo, a, b, f0, table, rho=rho, potentials=potentials, **kw)
        if geometry == "dense":
            out = ops.solve_dense(C, a, b, f0, table, rho=rho, stop=stop, **kw)
        else:
            x_c, y_c = (t.contiguous() for t in PointCloud(x, y).centred_points())
            out = ops.solve_points(
                x_c, y_c, a, b, f0, table, rho=rho, stop=stop, cost="sqeuclidean",
                cost_scale=1.0, **kw,
            )  # fmt: skip
        assert torch.equal(out[2], ref[2]), (out[2], ref[2])
        assert torch.allclose(out[0], ref[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(out[1], ref[1], rtol=1e-10, atol=1e-12)
        assert torch.allclose(out[3], ref[3], rtol=1e-5, atol=1e-14)


@pytest.mark.skipif("native" not in BACKENDS, reason="native-cpu unavailable")
def test_ops_reject_bad_relaxation():
    from sinkhorn_ot import ops

    C, a, b = problem()
    table = torch.full((2, 1), 0.1, dtype=F64)
    kw = {"max_iter": 10, "tol": None, "method": "log"}
    with pytest.raises(ValueError, match=r"`rho` must have shape \(2, 2\)"):
        ops.solve_dense(C, a, b, torch.zeros_like(a), table, rho=torch.ones(2, 3, dtype=F64), **kw)
    with pytest.raises(TypeError, match="`rho` must have the dtype"):
        ops.solve_dense(C, a, b, torch.zeros_like(a), table, rho=torch.ones(2, 2), **kw)
    with pytest.raises(ValueError, match="`stop` must be"):
        ops.solve_dense(C, a, b, torch.zeros_like(a), table, stop="never", **kw)
