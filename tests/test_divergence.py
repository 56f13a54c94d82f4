"""Sinkhorn divergences against GeomLoss, POT, OTT-JAX, sinkhorn() and closed forms."""

import math

import numpy as np
import pytest
import torch
from geomloss import SamplesLoss
from scipy.optimize import linprog

from sinkhorn_ot import (
    DenseCost,
    PointCloud,
    SinkhornConvergenceWarning,
    SinkhornLoss,
    pad_points,
    sinkhorn,
    sinkhorn_divergence,
)
from sinkhorn_ot.divergence import NATIVE_MIN_PADDING

F64 = torch.float64


def clouds(seed, batch=3, n=13, m=17, d=2, shift=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=F64)
    y = torch.randn(batch, m, d, generator=gen, dtype=F64) + shift
    a = torch.rand(batch, n, generator=gen, dtype=F64) + 0.1
    b = torch.rand(batch, m, generator=gen, dtype=F64) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def grads(value, inputs):
    return torch.autograd.grad(value.sum(), inputs)


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def assert_close(ours, ref, rtol):
    ours, ref = ours.detach(), ref.detach()
    scale = ref.abs().max()
    assert float((ours - ref).abs().max()) <= rtol * float(scale), (ours, ref)


@pytest.mark.parametrize("reach", [None, 0.7])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("scaling", [0.5, 0.9])
@pytest.mark.parametrize("blur", [0.05, 0.3])
def test_geomloss_parity_per_problem(reach, debias, scaling, blur):
    x, y, a, b = leaves(*clouds(0))
    mass = 1.0 if reach is None else 1.3  # unbalanced: unequal masses too
    loss = SamplesLoss(
        "sinkhorn",
        p=2,
        blur=blur,
        reach=reach,
        debias=debias,
        scaling=scaling,
        backend="tensorized",
    )
    ref = torch.stack(
        [loss(mass * a[i : i + 1], x[i : i + 1], b[i : i + 1], y[i : i + 1])[0] for i in range(3)]
    )
    ours = sinkhorn_divergence(
        x, y, mass * a, b, blur=blur, reach=reach, debias=debias, scaling=scaling
    )
    assert_close(ours, ref, 1e-6)
    ref_grads = grads(ref, (x, y, a, b))
    our_grads = grads(ours, (x, y, a, b))
    # Unbalanced: GeomLoss's autograd applies its forward weight rho + eps/2 where the
    # first variation has rho + eps (Séjourné et al. 2019, Prop. 12), and without
    # debiasing it also differentiates the raw cost's mass term eps (m(a) + m(b)) / 2
    # with that weight; ours are checked against finite differences below.
    factor = 1.0 if reach is None else (reach**2 + blur**2) / (reach**2 + blur**2 / 2)
    shift = 0.0 if reach is None or debias else blur**2 / 2  # eps / 2 on each weight
    ga, gb = ref_grads[2:]  # a enters as mass * a
    expected = [g * factor for g in ref_grads[:2]] + [
        ga * factor - mass * shift,
        gb * factor - shift,
    ]
    for mine, theirs in zip(our_grads, expected, strict=True):
        assert_close(mine, theirs, 1e-6)


@pytest.mark.parametrize("reach", [None, 0.5])
def test_geomloss_parity_batched_call_with_shared_diameter(reach):
    # GeomLoss's batched call uses one bounding box around the whole batch: the same
    # schedule is ours with `diameter=` given.
    x, y, a, b = leaves(*clouds(1, batch=4))
    flat = torch.cat([x.detach().reshape(-1, 2), y.detach().reshape(-1, 2)])
    diameter = float((flat.amax(0) - flat.amin(0)).norm())
    loss = SamplesLoss("sinkhorn", p=2, blur=0.1, reach=reach, scaling=0.9, backend="tensorized")
    ref = loss(a, x, b, y)
    ours = sinkhorn_divergence(x, y, a, b, blur=0.1, reach=reach, scaling=0.9, diameter=diameter)
    assert_close(ours, ref, 1e-6)
    if reach is None:
        for mine, theirs in zip(grads(ours, (x, y)), grads(ref, (x, y)), strict=True):
            assert_close(mine, theirs, 1e-6)


def test_geomloss_parity_p1_and_module_call_forms():
    # Raw OT only: GeomLoss's p = 1 cost is sqrt(max(|x - y|^2, 1e-8)), so its self
    # costs C(x_i, x_i) are 1e-4 rather than 0, which moves its debiased value by ~1e-4.
    x, y, a, b = leaves(*clouds(2, batch=1))
    options = dict(p=1, blur=0.2, scaling=0.7, debias=False)
    ref = SamplesLoss("sinkhorn", **options, backend="tensorized")(a, x, b, y)
    module = SinkhornLoss(**options)
    assert_close(module(a, x, b, y), ref, 1e-6)
    uniform = SamplesLoss("sinkhorn", **options, backend="tensorized")(x, y)
    assert_close(module(x, y), uniform, 1e-6)


def finite_difference(fn, t, h=1e-5):
    out = torch.zeros_like(t)
    flat = out.view(-1)
    for k in range(t.numel()):
        plus, minus = t.clone(), t.clone()
        plus.view(-1)[k] += h
        minus.view(-1)[k] -= h
        flat[k] = (fn(plus) - fn(minus)).sum() / (2 * h)
    return out


def _mass_preserving(g):
    # Balanced weights can only move along directions that keep the mass: compare the
    # gradient's projection on them (the constant it is defined up to removed).
    return g - g.mean(-1, keepdim=True)


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.6])
def test_gradients_match_finite_differences_at_convergence(reach, debias, grad):
    x, y, a, b = clouds(3, batch=1, n=5, m=6)
    a = a * (1.2 if reach else 1.0)
    options = dict(blur=0.4, reach=reach, debias=debias, mode="converged", tol=1e-13)
    options["max_iter"] = 5000
    xg, yg, ag = leaves(x, y, a)
    value = sinkhorn_divergence(xg, yg, ag, b, grad=grad, **options)
    gx, gy, ga = grads(value, (xg, yg, ag))
    fd_x = finite_difference(lambda t: sinkhorn_divergence(t, y, a, b, **options), x)
    fd_y = finite_difference(lambda t: sinkhorn_divergence(x, t, a, b, **options), y)
    assert_close(gx, fd_x, 1e-6)
    assert_close(gy, fd_y, 1e-6)
    if reach is not None:
        fd_a = finite_difference(lambda t: sinkhorn_divergence(x, y, t, b, **options), a)
        assert_close(ga, fd_a, 1e-6)
    else:  # a mass-preserving move of a, with b rescaled by the same mass (no-op here)
        direction = torch.tensor([[1.0, -1.0, 0.5, -0.25, -0.25]], dtype=F64)
        h = 1e-5
        moved = [sinkhorn_divergence(x, y, a + s * h * direction, b, **options) for s in (1, -1)]
        fd = (moved[0] - moved[1]) / (2 * h)
        assert abs(float((ga * direction).sum() - fd)) <= 1e-6 * float(fd.abs().clamp_min(1))


@pytest.mark.parametrize("reach", [None, 0.5])
def test_implicit_gradients_equal_envelope_at_convergence(reach):
    x, y, a, b = clouds(7, batch=2, n=9, m=7)
    b = b * (1.4 if reach else 1.0)
    options = dict(blur=0.3, reach=reach, mode="converged", tol=1e-12, max_iter=5000)
    out = {}
    for grad in ("envelope", "implicit"):
        inputs = leaves(x, y, a, b)
        value = sinkhorn_divergence(*inputs, grad=grad, **options)
        out[grad] = (value, *grads(value, inputs))
    envelope, implicit = out["envelope"], out["implicit"]
    assert_close(implicit[0], envelope[0], 1e-10)
    for k in (1, 2):  # x, y
        assert_close(implicit[k], envelope[k], 1e-8)
    project = (lambda g: g) if reach else _mass_preserving
    for k in (3, 4):  # a, b
        assert_close(project(implicit[k]), project(envelope[k]), 1e-8)


def test_implicit_gradients_on_given_costs():
    x, y, a, b = clouds(8, batch=2, n=6, m=5)
    costs = [0.5 * torch.cdist(u, v) ** 2 for u, v in ((x, y), (x, x), (y, y))]
    options = dict(blur=0.5, mode="converged", tol=1e-12, max_iter=5000)
    out = {}
    for grad in ("envelope", "implicit"):
        C_xy, C_xx, C_yy = leaves(*costs)
        value = sinkhorn_divergence(DenseCost(C_xy), (C_xx, C_yy), a, b, grad=grad, **options)
        out[grad] = (value, *grads(value, (C_xy, C_xx, C_yy)))
    for mine, theirs in zip(out["implicit"], out["envelope"], strict=True):
        assert_close(mine, theirs, 1e-8)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_native_half_steps_equal_torch(reach, p):
    from sinkhorn_ot import native

    if not native.availability("cpu", F64)[0]:
        pytest.skip("the native CPU kernels are not built here")
    xs = [
        torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=F64) for n in (40, 25)
    ]
    ys = [
        torch.randn(m, 3, generator=torch.Generator().manual_seed(m), dtype=F64) for m in (30, 45)
    ]
    x, y, a, b = pad_points(xs, ys)  # ragged: zero-weight padding on both sides
    # store_cost=False: a small p = 1 problem would otherwise store its cost (torch).
    options = dict(p=p, blur=0.05, reach=reach, store_cost=False)
    out = {}
    for backend in ("native", "torch"):
        xg, yg = leaves(x, y)
        value = sinkhorn_divergence(xg, yg, a, b, backend=backend, **options)
        out[backend] = (value, *grads(value, (xg, yg)))
    # p = 1: torch.cdist's matrix-product path leaves ~1e-8 on the self costs' diagonal
    # (the square root of a rounding error), the kernel's direct differences give 0.
    rtol = 1e-11 if p == 2 else 1e-7
    for mine, theirs in zip(out["native"], out["torch"], strict=True):
        assert_close(mine, theirs, rtol)
    # float32 runs natively too: the error against float64 is float32 rounding
    # amplified by |C| / eps (measured: 6e-7 for p = 2, 2.3e-4 for p = 1).
    value32 = sinkhorn_divergence(
        x.float(), y.float(), a.float(), b.float(), backend="native", **options
    )
    assert_close(value32.double(), out["torch"][0], 1e-6 if p == 2 else 1e-3)


def test_auto_backend_picks_the_measured_faster_half_steps():
    from sinkhorn_ot import native

    if not native.availability("cpu", F64)[0]:
        pytest.skip("the native CPU kernels are not built here")
    x, y, a, b = clouds(13, batch=2, n=30, m=30, d=3)

    def run(backend, **kw):
        return sinkhorn_divergence(x, y, a, b, blur=0.1, backend=backend, store_cost=False, **kw)

    # float64, D <= 8: the kernel; float32 with p = 2: torch's absorbed matrix products.
    assert torch.equal(run("auto"), run("native"))
    assert not torch.equal(run("native"), run("torch"))  # the two paths round differently
    x, y, a, b = x.float(), y.float(), a.float(), b.float()
    assert torch.equal(run("auto"), run("torch"))
    assert torch.equal(run("auto", p=1), run("native", p=1))
    # ... unless padding is at least NATIVE_MIN_PADDING of the pairs (a ragged batch),
    # which the kernel skips: here 1 - (30 * 6 + 6 * 30 + 30 * 30 + 6 * 6) / (4 * 30 * 30)
    b = b.clone()
    b[:, 6:] = 0
    b /= b.sum(-1, keepdim=True)
    assert padding_share_of(x, y, a, b) > NATIVE_MIN_PADDING
    assert torch.equal(run("auto"), run("native"))
    assert not torch.equal(run("auto"), run("torch"))


def padding_share_of(x, y, a, b) -> float:
    from sinkhorn_ot._divergence_loop import stack_points
    from sinkhorn_ot.divergence import padding_share

    stack = stack_points(x, y, a, b, debias=True, cost="sqeuclidean", scale=0.5, store=False)
    return padding_share(stack)


def test_native_backend_errors_name_the_reason():
    x, y, a, b = clouds(12, batch=1)
    with pytest.raises(ValueError, match="`backend` must be"):
        sinkhorn_divergence(x, y, a, b, backend="cuda")


def test_implicit_gradients_need_the_converged_mode():
    x, y, a, b = clouds(9, batch=1)
    with pytest.raises(ValueError, match=r"grad='implicit'\).*needs mode='converged'"):
        sinkhorn_divergence(x, y, a, b, grad="implicit")
    with pytest.raises(ValueError, match="`grad`"):
        sinkhorn_divergence(x, y, a, b, grad="unroll")


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.8])
def test_converged_mode_equals_three_converged_sinkhorn_solves(reach, debias):
    x, y, a, b = leaves(*clouds(4, batch=2, n=8, m=10))
    if reach is not None:  # unequal masses, both different from 1
        a, b = leaves(1.3 * a.detach(), 0.6 * b.detach())
    eps = 0.5**2
    value = sinkhorn_divergence(
        x, y, a, b, blur=0.5, reach=reach, debias=debias, mode="converged", tol=1e-11,
        max_iter=5000,
    )  # fmt: skip
    rho = None if reach is None else reach**2

    def ot_value(u, v, wu, wv):
        res = sinkhorn(
            PointCloud(u, v, scale=0.5),
            wu,
            wv,
            eps=eps,
            rho_a=rho,
            rho_b=rho,
            tol=1e-11,
            max_iter=20000,
            grad="envelope",
            backend="torch",
        )
        return res.value

    # sinkhorn()'s value is the primal cost with the generalised KL(P | a b^T), whose
    # mass term is eps m(a) m(b); GeomLoss's formula has eps (m(a) + m(b)) / 2 instead.
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    ref = ot_value(x, y, a, b)
    if debias:
        ref = ref - 0.5 * ot_value(x, x, a, a) - 0.5 * ot_value(y, y, b, b)
        if rho is not None:
            ref = ref + 0.5 * eps * (mass_a - mass_b) ** 2
    elif rho is not None:
        ref = ref + eps * (0.5 * (mass_a + mass_b) - mass_a * mass_b)
    assert_close(value, ref, 1e-9)
    inputs = (x, y) if rho is None else (x, y, a, b)  # balanced weights: a gauge constant
    for mine, theirs in zip(grads(value, inputs), grads(ref, inputs), strict=True):
        assert_close(mine, theirs, 1e-7)


def test_identity_is_exactly_zero_with_finite_gradients():
    x, _, a, _ = clouds(5)
    xg, ag = leaves(x, a)
    for p in (1, 2):
        value = sinkhorn_divergence(xg, xg, ag, ag, p=p, blur=0.05)
        assert float(value.detach().abs().max()) <= 1e-12
        for g in grads(value, (xg, ag)):
            assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blur", [0.01, 0.05, 0.5])
def test_nonnegative_at_default_scaling(seed, blur):
    x, y, a, b = clouds(10 + seed, batch=4, n=20, m=25, d=3, shift=0.1 * seed)
    assert bool((sinkhorn_divergence(x, y, a, b, blur=blur) >= 0).all())


def test_symmetric():
    x, y, a, b = clouds(6)
    for reach in (None, 0.8):
        forward = sinkhorn_divergence(x, y, a, b, blur=0.1, reach=reach)
        backward = sinkhorn_divergence(y, x, b, a, blur=0.1, reach=reach)
        assert_close(forward, backward, 1e-12)


def transport_lp(a, b, cost):
    """The unregularised OT cost by SciPy's linear programming (an independent oracle)."""
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    constraints = np.vstack([rows, cols])
    result = linprog(cost.ravel(), A_eq=constraints, b_eq=np.concatenate([a, b]), method="highs")
    assert result.success
    return result.fun


def test_tends_to_half_squared_wasserstein_as_blur_vanishes():
    x, y, a, b = clouds(7, batch=1, n=8, m=10)
    exact = transport_lp(a[0].numpy(), b[0].numpy(), 0.5 * torch.cdist(x[0], y[0]).square().numpy())
    errors = [
        abs(float(sinkhorn_divergence(x, y, a, b, blur=blur, scaling=0.95)) - exact)
        for blur in (0.3, 0.1, 0.03)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 0.02 * exact  # one update per temperature: not fully converged


def test_translation():
    x, y, a, b = clouds(8, batch=2, n=8, m=10)
    t = torch.tensor([3.0, -2.0], dtype=F64)
    options = dict(blur=0.5, mode="converged", tol=1e-11, max_iter=5000)
    base = sinkhorn_divergence(x, y, a, b, **options)
    # Moving both clouds changes nothing; moving one adds <t, mean(β) - mean(α)> + |t|^2/2
    # (the cost |x - y - t|^2 / 2 differs from |x - y|^2 / 2 by separable terms).
    assert_close(sinkhorn_divergence(x + t, y + t, a, b, **options), base, 1e-9)
    means = (b.unsqueeze(-1) * y).sum(1) - (a.unsqueeze(-1) * x).sum(1)
    expected = base + means @ t + 0.5 * float(t @ t)
    assert_close(sinkhorn_divergence(x, y + t, a, b, **options), expected, 1e-9)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_ragged_batch_equals_loop_of_single_problems(reach, backend):
    """The native kernel skips the padded rows and columns (point_softmin's row_lengths
    and trailing dropped points): the same values and gradients as unpadded problems."""
    from sinkhorn_ot import native

    if backend == "native" and not native.availability("cpu", F64)[0]:
        pytest.skip("the native CPU kernels are not built here")
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(n, 2, generator=gen, dtype=F64) for n in (9, 4, 12)]
    ys = [torch.randn(m, 2, generator=gen, dtype=F64) + 1 for m in (7, 11, 3)]
    x, y, a, b = pad_points(xs, ys)
    x = x.clone()
    x[0, 9:] = 1e6  # where padding sits does not matter
    x.requires_grad_(True)
    batch = sinkhorn_divergence(x, y, a, b, blur=0.1, reach=reach, backend=backend)
    (grad_x,) = grads(batch, (x,))
    for k, (xk, yk) in enumerate(zip(xs, ys, strict=True)):
        xk = xk.clone().requires_grad_(True)
        alone = sinkhorn_divergence(xk, yk, blur=0.1, reach=reach, backend="torch")
        assert_close(batch[k], alone, 1e-12)
        (gk,) = grads(alone, (xk,))
        assert_close(grad_x[k, : len(xk)], gk, 1e-10)
        assert bool((grad_x[k, len(xk) :] == 0).all())


def test_single_points_and_zero_weights_give_finite_values_and_gradients():
    for x, y in [
        (torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)),
        (torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)),
    ]:
        xg, yg = leaves(x, y)
        value = sinkhorn_divergence(xg, yg, blur=0.05)
        expected = 0.5 * float(((x - y) ** 2).sum())  # one point each: the plan is the pair
        assert abs(float(value.detach()) - expected) <= 1e-12
        assert all(bool(torch.isfinite(g).all()) for g in grads(value, (xg, yg)))
    x, y, a, b = clouds(11, batch=1)
    a = a.clone()
    a[0, :5] = 0
    a = a / a.sum()
    xg, ag = leaves(x, a)
    value = sinkhorn_divergence(xg, y, ag, b, blur=0.05)
    assert all(bool(torch.isfinite(g).all()) for g in grads(value, (xg, ag)))


def test_dense_costs_match_point_clouds():
    x, y, a, b = leaves(*clouds(12))

    def half_sq(u, v):
        return 0.5 * ((u.unsqueeze(2) - v.unsqueeze(1)) ** 2).sum(-1)

    def both(**options):
        points = sinkhorn_divergence(x, y, a, b, blur=0.5, diameter=4.0, **options)
        dense = sinkhorn_divergence(
            DenseCost(half_sq(x, y)),
            (half_sq(x, x), half_sq(y, y)),
            a,
            b,
            blur=0.5,
            diameter=4.0,
            **options,
        )
        return dense, points

    dense, points = both(scaling=0.8)
    assert_close(dense, points, 1e-10)
    # The gradients agree at convergence (the annealed ones differ by design, see
    # stack_costs: the two plans of OT(α, β) are averaged for a given cost).
    dense, points = both(mode="converged", tol=1e-12, max_iter=5000)
    for mine, theirs in zip(grads(dense, (x, y, a, b)), grads(points, (x, y, a, b)), strict=True):
        assert_close(mine, theirs, 1e-8)


def test_eps_is_blur_to_the_p_and_float32_runs():
    x, y, a, b = clouds(13)
    assert_close(
        sinkhorn_divergence(x, y, a, b, eps=0.01), sinkhorn_divergence(x, y, a, b, blur=0.1), 1e-12
    )
    single = sinkhorn_divergence(x.float(), y.float(), a.float(), b.float(), blur=0.05)
    assert single.dtype == torch.float32
    assert_close(single.double(), sinkhorn_divergence(x, y, a, b, blur=0.05), 1e-4)


def test_converged_mode_warns_when_it_runs_out_of_iterations():
    x, y, a, b = clouds(14)
    with pytest.warns(SinkhornConvergenceWarning, match="did not reach tol"):
        sinkhorn_divergence(x, y, a, b, blur=0.01, mode="converged", max_iter=2, tol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(p=3), ValueError, "`p` must be 1"),
        (dict(blur=0.1, eps=0.01), ValueError, "not both"),
        (dict(blur=-1.0), ValueError, "`blur` must be a positive"),
        (dict(scaling=1.0), ValueError, r"`scaling` must be a float in \(0, 1\)"),
        (dict(mode="exact"), ValueError, "`mode` must be one of"),
        (dict(reach=0.0), ValueError, "`reach` must be a positive"),
    ],
)
def test_bad_options(kwargs, error, match):
    x, y, a, b = clouds(15)
    with pytest.raises(error, match=match):
        sinkhorn_divergence(x, y, a, b, **kwargs)


def test_bad_inputs():
    x, y, a, b = clouds(16)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn_divergence(x, y, a * 2, b)
    with pytest.raises(ValueError, match="share the batch size"):
        sinkhorn_divergence(x, y[:2], a, b)
    with pytest.raises(ValueError, match=r"`a` must have shape \(3, 13\)"):
        sinkhorn_divergence(x, y, a[:, :5], b)
    with pytest.raises(TypeError, match="pair"):
        sinkhorn_divergence(DenseCost(torch.rand(3, 13, 17, dtype=F64)), None, a, b)


def test_ott_jax_conventions():
    ott = pytest.importorskip("ott")  # the test extra installs it
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from ott.geometry import pointcloud
    from ott.tools import sinkhorn_divergence as ott_divergence

    x, y, a, b = clouds(17, batch=1, n=12, m=9)
    value, _ = ott_divergence.sinkhorn_divergence(
        pointcloud.PointCloud,
        np.asarray(x[0]),
        np.asarray(y[0]),
        a=np.asarray(a[0]),
        b=np.asarray(b[0]),
        epsilon=0.1,
        solve_kwargs={"threshold": 1e-11, "max_iterations": 5000},
    )
    del ott
    # OTT's cost |x - y|^2 with epsilon e is twice ours (|x - y|^2 / 2) with eps = e / 2.
    ours = sinkhorn_divergence(x, y, a, b, eps=0.05, mode="converged", tol=1e-11, max_iter=5000)
    assert math.isclose(2 * float(ours), float(value), rel_tol=1e-8)
