"""Adversarial inputs of the robustness issue: one regression test per item.

Each test quotes its reproduction; the oracles are independent of the solver
(finite differences, ``scipy.optimize.linprog``).
"""

import pytest
import torch

from sinkhorn_ot import pad_batch, sinkhorn

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
