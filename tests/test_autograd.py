"""grad="implicit" and grad="envelope" against unrolled autograd and finite differences."""

import pytest
import torch

import sinkhorn_ot.autograd as implicit_module
from sinkhorn_ot import pad_batch, sinkhorn
from sinkhorn_ot.testing import random_problem

F64 = torch.float64
CONVERGED = {"tol": 1e-13, "max_iter": 100000}


def padded_problem(seed=0):
    C, a, b = random_problem(2, 5, 4, seed=seed)
    a[1, 2] = 0
    b[0, 3] = 0
    return C, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def losses(res, weights):
    """Losses on every output, so each path of the backward is exercised."""
    W = weights
    return {
        "plan": (res.plan * W).sum(),
        "potentials": (res.f * W[:, :, 0]).sum() + (res.g.square() * W[:, 0, :]).sum(),
        "value": (res.value * torch.arange(1, res.value.numel() + 1)).sum(),
        "value_linear": res.value_linear.sum(),
    }


def gradients(mode, C, a, b, eps, output, weights, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (C, a, b, eps)]
    opts = {"tol": None, "max_iter": 600} if mode == "unroll" else dict(CONVERGED)
    opts.update(kw)
    res = sinkhorn(*leaves[:3], eps=leaves[3], grad=mode, **opts)
    losses(res, weights)[output].backward()
    return [t.grad for t in leaves]


def rel(x, y):
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


@pytest.mark.parametrize("output", ["plan", "potentials", "value", "value_linear"])
@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 3, 6)])
def test_implicit_equals_unroll_at_convergence(backend, output, shape):
    C, a, b = random_problem(*shape, seed=1)
    a[1, 0] = 0  # padding too
    a = a / a.sum(-1, keepdim=True)
    eps = torch.tensor([0.3, 0.15], dtype=F64)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    implicit = gradients("implicit", C, a, b, eps, output, W, backend=backend)
    unrolled = gradients("unroll", C, a, b, eps, output, W)
    for name, gi, gu in zip("C a b eps".split(), implicit, unrolled):
        assert rel(gi, gu) <= 1e-6, name


def test_conjugate_gradients_equal_dense_solve(monkeypatch):
    C, a, b = padded_problem(3)
    eps = torch.tensor([0.2, 0.4], dtype=F64)
    W = torch.randn(C.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    dense = gradients("implicit", C, a, b, eps, "plan", W)
    monkeypatch.setattr(implicit_module, "DENSE_MAX", 0)
    cg = gradients("implicit", C, a, b, eps, "plan", W)
    for gd, gc in zip(dense, cg):
        assert rel(gc, gd) <= 1e-8


def test_envelope_equals_implicit_for_value(backend):
    C, a, b = padded_problem(5)
    eps = torch.tensor([0.25, 0.5], dtype=F64)
    W = torch.ones_like(C)
    implicit = gradients("implicit", C, a, b, eps, "value", W, backend=backend)
    envelope = gradients("envelope", C, a, b, eps, "value", W, backend=backend)
    for name, gi, ge in zip("C a b eps".split(), implicit, envelope):
        assert rel(ge, gi) <= 1e-8, name


def test_envelope_is_danskin_and_detaches_other_outputs():
    C, a, b = random_problem(1, 4, 4, seed=6)
    C.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.3, grad="envelope", **CONVERGED)
    assert res.value.requires_grad
    assert not any(t.requires_grad for t in (res.plan, res.f, res.g, res.value_linear))
    res.value.sum().backward()
    assert torch.allclose(C.grad, res.plan, rtol=1e-12, atol=0)


def test_implicit_gradcheck_on_small_problems():
    C, a, b = random_problem(2, 3, 4, seed=7)
    W = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8), dtype=F64)

    def func(C, a_raw, b_raw, eps):
        # Normalising keeps the masses equal under gradcheck's perturbations.
        a = a_raw / a_raw.sum(-1, keepdim=True)
        b = b_raw / b_raw.sum(-1, keepdim=True)
        res = sinkhorn(C, a, b, eps=eps, grad="implicit", **CONVERGED)
        return (res.plan * W).sum((1, 2)), res.f, res.value

    eps = torch.tensor([0.3, 0.6], dtype=F64)
    b_raw = b.clone()
    inputs = tuple(t.clone().requires_grad_(True) for t in (C, a, b_raw, eps))
    assert torch.autograd.gradcheck(func, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def directional_fd(fn, x, direction, h=1e-5):
    return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("output", ["plan", "potentials"])
def test_mass_preserving_directional_derivatives(backend, output):
    C, a, b = padded_problem(9)
    eps = torch.tensor([0.3, 0.2], dtype=F64)
    W = torch.randn(C.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    gen = torch.Generator().manual_seed(11)
    # Directions that keep both masses (sum zero) and leave padding at zero.
    da = torch.randn(a.shape, generator=gen, dtype=F64) * (a > 0)
    da = (da - (da.sum(-1, keepdim=True) / (a > 0).sum(-1, keepdim=True))) * (a > 0)
    db = torch.randn(b.shape, generator=gen, dtype=F64) * (b > 0)
    db = (db - (db.sum(-1, keepdim=True) / (b > 0).sum(-1, keepdim=True))) * (b > 0)
    # Padded cost entries are outside the problem (their gradient is zero by contract).
    dC = (
        torch.randn(C.shape, generator=gen, dtype=F64) * (a > 0).unsqueeze(2) * (b > 0).unsqueeze(1)
    )

    def loss(t):
        res = sinkhorn(C + t * dC, a + t * da, b + t * db, eps=eps, grad="none", **CONVERGED)
        return losses(res, W)[output]

    gC, ga, gb, _ = gradients("implicit", C, a, b, eps, output, W, backend=backend)
    analytic = (gC * dC).sum() + (ga * da).sum() + (gb * db).sum()
    numeric = directional_fd(loss, torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    assert abs(float(analytic - numeric)) <= 1e-6 * max(1.0, abs(float(numeric)))


def test_eps_tensor_gradient_matches_finite_differences(backend):
    C, a, b = random_problem(2, 4, 5, seed=12)
    eps = torch.tensor([0.2, 0.5], dtype=F64)
    W = torch.randn(C.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    _, _, _, g_eps = gradients("implicit", C, a, b, eps, "plan", W, backend=backend)

    def loss(e):
        return losses(sinkhorn(C, a, b, eps=e, grad="none", **CONVERGED), W)["plan"]

    for k in range(2):
        direction = torch.zeros(2, dtype=F64)
        direction[k] = 1
        assert abs(float(g_eps[k] - directional_fd(loss, eps, direction))) <= 1e-6


def test_padded_entries_get_exactly_zero_gradient_and_no_nan(backend):
    gen = torch.Generator().manual_seed(14)
    Cs = [torch.rand(n, m, generator=gen, dtype=F64) for n, m in [(3, 5), (6, 2)]]
    C, a, b = pad_batch(Cs)
    for mode in ("implicit", "envelope", "unroll"):
        leaves = [t.clone().requires_grad_(True) for t in (C, a, b)]
        opts = {"backend": backend} if mode != "unroll" else {}
        res = sinkhorn(*leaves, eps=0.1, grad=mode, **opts)
        loss = res.value.sum()
        if mode != "envelope":
            loss = loss + res.plan.square().sum() + res.f.sum() - res.g.sum()
        loss.backward()
        gC, ga, gb = (t.grad for t in leaves)
        assert all(torch.isfinite(t).all() for t in (gC, ga, gb)), mode
        assert (gC[0, 3:] == 0).all() and (gC[1, :, 2:] == 0).all(), mode
        assert (ga[0, 3:] == 0).all() and (gb[1, 2:] == 0).all(), mode


def test_second_derivative_raises_clear_error():
    C, a, b = random_problem(1, 3, 3, seed=15)
    C.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.3, grad="implicit")
    (g,) = torch.autograd.grad(res.plan.square().sum(), C, create_graph=True)
    with pytest.raises(RuntimeError, match=r"second derivatives.*grad='unroll'"):
        torch.autograd.grad(g.sum(), C)


def test_implicit_is_the_default_and_float32_works(backend):
    C64, a, b = random_problem(4, 16, 12, seed=16)
    C = C64.float().requires_grad_(True)
    res = sinkhorn(C, a.float(), b.float(), eps=0.05, backend=backend)
    res.value_linear.sum().backward()
    ref = C64.clone().requires_grad_(True)
    sinkhorn(ref, a, b, eps=0.05, tol=1e-12).value_linear.sum().backward()
    assert torch.isfinite(C.grad).all()
    assert rel(C.grad.double(), ref.grad) <= 1e-3


@pytest.mark.parametrize("padded", [False, True])
def test_closed_form_parameter_gradients_equal_autograd_of_residuals(padded):
    """The backward's closed-form θ̄ matches autograd through F(x, θ) itself, at any
    (f, g) and λ (not only at the fixed point), with zero-weight padding."""
    C, a, b = padded_problem() if padded else random_problem(2, 5, 4, seed=3)
    gen = torch.Generator().manual_seed(7)
    eps = torch.tensor([0.3, 0.7], dtype=F64)
    f = torch.randn(a.shape, generator=gen, dtype=F64) * 0.1
    g = torch.randn(b.shape, generator=gen, dtype=F64) * 0.1
    lam_f = torch.randn(a.shape, generator=gen, dtype=F64)
    lam_g = torch.randn(b.shape, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_(True) for t in (C, a, b, eps)]
    F_f, F_g = implicit_module.residuals(*leaves, f, g)
    total = -(lam_f * F_f).sum() - (lam_g * F_g).sum()
    expected = torch.autograd.grad(total, leaves)

    Q = torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - C) / eps.view(-1, 1, 1))
    got = implicit_module.parameter_grads(Q, C, a, b, eps, f, g, lam_f, lam_g, [True] * 4)
    for name, want, have in zip("C a b eps".split(), expected, got):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12, msg=name)
    partial = implicit_module.parameter_grads(
        Q, C, a, b, eps, f, g, lam_f, lam_g, [False, True, False, True]
    )
    assert partial[0] is None and partial[2] is None


#: Run in a fresh process: after ``torch.set_num_threads`` MKL's batched LU fails for the
#: rest of the process (torch 2.14), which would leak into other tests' oracles.
_AFTER_SET_NUM_THREADS = """
import torch
torch.set_num_threads(torch.get_num_threads())
from sinkhorn_ot import PointCloud, sinkhorn
C = torch.rand(4, 400, 420, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
C.requires_grad_(True)
res = sinkhorn(C, eps=0.05, tol=1e-9)
(grad,) = torch.autograd.grad(res.value.sum(), C)
print("implicit", float((grad - res.plan.detach()).abs().max()))
gen = torch.Generator().manual_seed(1)
x = torch.randn(2, 300, 3, generator=gen, dtype=torch.float64)
y = torch.randn(2, 350, 3, generator=gen, dtype=torch.float64) + 1
polished = sinkhorn(PointCloud(x, y, scale=0.5), eps=0.005, grad="none")
print("newton", bool(polished.converged.all()), int(polished.n_iter.max()))
"""


def test_dense_solves_survive_set_num_threads():
    """The implicit backward's dense solve and the Newton polish, after a call of
    ``torch.set_num_threads`` (the value's gradient is the plan: Danskin)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _AFTER_SET_NUM_THREADS], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert float(lines["implicit"]) <= 1e-9
    converged, n_iter = lines["newton"].split()
    assert converged == "True" and int(n_iter) <= 1000
