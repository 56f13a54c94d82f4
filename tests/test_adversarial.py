"""Adversarial inputs of the robustness issue: one regression test per item.

Each test quotes its reproduction; the oracles are independent of the solver
(finite differences, ``scipy.optimize.linprog``).
"""

import numpy as np
import pytest
import scipy.optimize
import torch

from sinkhorn_ot import emd, pad_batch, sinkhorn

F64 = torch.float64


def _value(C, a, b, **kw):
    return sinkhorn(C, a, b, eps=0.1, tol=1e-14, max_iter=100000, grad="none", **kw).value


@pytest.mark.parametrize("grad", ["implicit", "envelope", "unroll"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_padded_weights_get_zero_gradient_when_other_side_is_none(grad, side):
    """``b = [.5, 0, .5, 0]`` (requires_grad), ``a=None``, ``C = rand(3, 4)``:
    ``sinkhorn(C, None, b, eps=0.1).value.backward()`` gave ``b.grad = [0.58, 0.43,
    0.28, 0.43]``; the padded entries must get exactly 0 and the real ones the
    derivative of ``value`` (central finite differences; ``a=None`` follows ``b``'s
    mass, so every direction on the real entries keeps the masses consistent)."""
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(3, 4, generator=gen, dtype=F64)
    if side == "a":
        C = C.T.contiguous()
    w = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64, requires_grad=True)

    def args(weights):
        return (None, weights) if side == "b" else (weights, None)

    out = sinkhorn(C, *args(w), eps=0.1, tol=1e-13, max_iter=10000, grad=grad)
    out.value.backward()
    assert w.grad[1] == 0 and w.grad[3] == 0
    h = 1e-6
    for j, direction in ((0, [1.0, 0, 0, 0]), (2, [0, 0, 1.0, 0]), (None, [1.0, 0, -0.5, 0])):
        d = torch.tensor(direction, dtype=F64)
        fd = (_value(C, *args(w.detach() + h * d)) - _value(C, *args(w.detach() - h * d))) / (2 * h)
        assert torch.isclose(w.grad @ d, fd, rtol=1e-6, atol=1e-8), (j, w.grad, fd)


def test_pad_batch_missing_side_gives_padded_weights_zero_gradient():
    """``pad_batch([C], None, [b])`` with ``b = [.5, 0, .5, 0]``: the uniform ``a`` took its
    mass from ``b.sum()``, so ``b.grad`` was ``[0.61, 0.42, 0.22, 0.42]``."""
    gen = torch.Generator().manual_seed(0)
    b = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=F64, requires_grad=True)
    C, a, bb = pad_batch([torch.rand(3, 4, generator=gen, dtype=F64)], None, [b])
    sinkhorn(C, a, bb, eps=0.1).value.backward()
    assert b.grad[1] == 0 and b.grad[3] == 0
    assert (b.grad[[0, 2]] != 0).all()


def test_weights_of_another_dtype_than_C_are_compared_at_their_own_precision():
    """float64 ``C`` (7×2) with float32 ``a = torch.full((7,), 1/7)`` and
    ``b = torch.full((2,), .5)`` raised "same total mass ... a.sum() = 1 and b.sum() = 1":
    the masses were compared at float64 precision although the weights carry float32's."""
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(7, 2, generator=gen, dtype=F64)
    a = torch.full((7,), 1 / 7)
    b = torch.full((2,), 0.5)
    assert a.sum(dtype=F64) != b.sum(dtype=F64)  # they differ by float32 rounding
    res = sinkhorn(C, a, b, eps=0.1, tol=1e-10)
    assert res.converged and res.plan.dtype == F64
    assert torch.allclose(res.plan.sum(0), b.double() * float(a.sum(dtype=F64)), atol=1e-9)
    # One float64 side: still the float32 side's precision that counts.
    sinkhorn(C, a.double(), b, eps=0.1)
    sinkhorn(C.float(), a.double(), b, eps=0.1)


@pytest.mark.parametrize(
    ("a_dtype", "b_dtype", "c_dtype"),
    [(torch.float32, torch.float32, F64), (F64, torch.float32, F64), (F64, F64, torch.float32)],
)
def test_genuinely_unequal_masses_are_still_rejected_with_useful_digits(a_dtype, b_dtype, c_dtype):
    """``a.sum() = 1``, ``b.sum() = 1.01`` must be rejected whatever the dtypes, and the
    message must show enough digits to tell the masses apart (it printed ``1`` and ``1``)."""
    C = torch.rand(7, 2, dtype=c_dtype)
    a = torch.full((7,), 1 / 7, dtype=a_dtype)
    b = torch.full((2,), 0.505, dtype=b_dtype)
    with pytest.raises(
        ValueError,
        match=r"same total mass.*a.sum\(\) = (1\.0|0\.9)\d* and b.sum\(\) = 1\.0(1|0999)\d* ",
    ):
        sinkhorn(C, a, b, eps=0.1)
    # float64 weights are held to float64 precision even with a float32 C.
    if a_dtype == b_dtype == F64:
        with pytest.raises(ValueError, match="same total mass"):
            sinkhorn(C, a, b * (1 - 1e-6) / 1.01, eps=0.1)


def _linprog_value(C, a, b):
    """The LP optimum of the full problem (padded rows and columns kept as zero-mass
    equality constraints), with dense constraints built independently of ``emd``."""
    n, m = C.shape
    A_eq = np.zeros((n + m, n * m))
    for i in range(n):
        A_eq[i, i * m : (i + 1) * m] = 1
    for j in range(m):
        A_eq[n + j, j::m] = 1
    res = scipy.optimize.linprog(
        C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs"
    )
    assert res.status == 0, res.message
    return res.fun


@pytest.mark.parametrize("seed", range(8))
def test_emd_duals_are_feasible_on_every_entry_including_padding(seed):
    """3×3 ``C`` with one zero weight on each side: ``f_i + g_j <= C_ij`` failed by 9.0 on
    the padded×padded entry (both potentials were c-transforms of the real duals only).
    The duals must be feasible everywhere and optimal: ``<f, a> + <g, b>`` = LP value."""
    rng = np.random.default_rng(seed)
    if seed == 0:  # the reported shape: 3×3, one zero weight per side, far padded cost
        # Real block cheap, padded row/column expensive against it, padded x padded
        # cheap: the two c-transforms add up to about 20 > C[2, 0] = 0.
        C = np.full((3, 3), 10.0)
        C[:2, 1:] = rng.random((2, 2))
        C[2, 0] = 0.0
        a, b = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    else:
        n, m = rng.integers(2, 9, size=2)
        C = rng.random((n, m)) * 10 - 3  # negative entries too
        a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
        a[rng.random(n) < 0.4], b[rng.random(m) < 0.4] = 0.0, 0.0
        a[0], b[-1] = max(a[0], 0.1), max(b[-1], 0.1)  # at least one real point a side
        a[-1], b[0] = 0.0, 0.0  # and at least one padded one
        a, b = a / a.sum(), b / b.sum()
    res = emd(*(torch.as_tensor(x, dtype=F64) for x in (C, a, b)))
    f, g = res.f.numpy(), res.g.numpy()
    assert np.isfinite(f).all() and np.isfinite(g).all()
    assert (f[:, None] + g[None, :] - C).max() <= 1e-9
    lp = _linprog_value(C, a, b)
    assert np.isclose(float(res.value), lp, rtol=1e-9, atol=1e-12)
    assert np.isclose(f @ a + g @ b, lp, rtol=1e-9, atol=1e-12)
    assert (res.plan.numpy()[a == 0] == 0).all() and (res.plan.numpy()[:, b == 0] == 0).all()


@pytest.mark.parametrize(
    ("C", "eps", "pattern"),
    [
        # 1e-50 is 0 in float32 (as a float and as a float64 tensor).
        (torch.rand(3, 3), 1e-50, r"`eps` must be > 0 in the compute dtype torch\.float32"),
        (
            torch.rand(3, 3),
            torch.tensor(1e-50, dtype=F64),
            r"`eps` must be > 0 in the compute dtype torch\.float32",
        ),
        # float16 C is computed in float32: the float32 limits apply.
        (torch.rand(3, 3).half(), 1e-50, r"`eps` must be > 0 in the compute dtype torch\.float32"),
        # 1e-320 is a float64 subnormal: positive, but 1/eps = inf.
        (torch.rand(3, 3, dtype=F64), 1e-320, r"`eps` is too small.*torch\.float64.*1/eps"),
        (torch.zeros(3, 3), 1e-40, r"`eps` is too small.*torch\.float32.*1/eps"),
        # 1/eps is finite but max|C| / eps = 1e40 is not, in float32.
        (torch.full((3, 3), 1e4), 1e-36, r"`eps` is too small for the cost scale.*max\|C\|"),
    ],
)
def test_eps_unusable_in_the_compute_dtype_is_a_value_error_naming_eps(C, eps, pattern):
    """``sinkhorn(torch.rand(3, 3), eps=1e-50)`` (float32) and ``sinkhorn(C64, eps=1e-320)``
    raised ``FloatingPointError`` from inside the loop instead of a ``ValueError``."""
    with pytest.raises(ValueError, match=pattern):
        sinkhorn(C, eps=eps)
    # The same eps is fine where the compute dtype can hold it.
    if C.dtype != F64 and float(eps) >= 1e-300:
        assert torch.isfinite(sinkhorn(C.double(), eps=eps, max_iter=3, tol=None).f).all()


@pytest.mark.parametrize("solver", [sinkhorn, emd])
def test_cost_on_meta_device_is_a_value_error_naming_C_and_the_device(solver):
    """``sinkhorn(torch.rand(3, 3, device="meta"), eps=0.1)`` raised a raw
    ``NotImplementedError`` ("Cannot copy out of meta tensor")."""
    C = torch.rand(3, 3, device="meta")
    kw = {"eps": 0.1} if solver is sinkhorn else {}
    with pytest.raises(ValueError, match=r"`C` is on the 'meta' device"):
        solver(C, **kw)
    with pytest.raises(TypeError, match=r"`C` must be a dense \(strided\) tensor.*sparse_coo"):
        solver(torch.rand(3, 3).to_sparse(), **kw)
