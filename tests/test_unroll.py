"""grad="unroll": autograd through the iterations equals finite differences (float64)."""

import pytest
import torch

from sinkhorn_ot import sinkhorn
from sinkhorn_ot.testing import random_problem


def loss_of(C, a, b, eps, output, method):
    res = sinkhorn(C, a, b, eps=eps, grad="unroll", method=method, tol=None, max_iter=30)
    weights = torch.linspace(-1, 1, res.plan.numel(), dtype=C.dtype).reshape(res.plan.shape)
    return {
        "plan": lambda: (res.plan * weights).sum(),
        "value": lambda: res.value.sum(),
        "f": lambda: (
            res.f * torch.linspace(0, 1, res.f.numel(), dtype=C.dtype).view_as(res.f)
        ).sum(),
    }[output]()


@pytest.mark.parametrize("output", ["plan", "value", "f"])
@pytest.mark.parametrize("method", ["log", "kernel"])
def test_unrolled_gradients_match_finite_differences(output, method):
    C, a, b = random_problem(2, 4, 3, seed=3)
    C.requires_grad_(True)
    a.requires_grad_(True)
    eps = torch.tensor([0.3, 0.5], dtype=torch.float64, requires_grad=True)

    def func(C, a, eps):
        # Keep the masses equal under perturbation: b follows a's mass.
        return loss_of(C, a, b * a.sum(-1, keepdim=True), eps, output, method)

    assert torch.autograd.gradcheck(func, (C, a, eps), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unrolled_gradient_is_finite_with_padding():
    C, a, b = random_problem(1, 5, 4, seed=4)
    a[0, 1] = 0
    a = a / a.sum()
    C.requires_grad_(True)
    a.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.2, grad="unroll", tol=None, max_iter=20)
    (res.plan.square().sum() + res.value.sum()).backward()
    assert torch.isfinite(C.grad).all() and torch.isfinite(a.grad).all()
    assert (C.grad[0, 1] == 0).all()  # a padded row does not influence anything


def test_grad_none_detaches():
    C, a, b = random_problem(1, 3, 3, seed=5)
    C.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.2, grad="none")
    assert not res.plan.requires_grad and not res.value.requires_grad
