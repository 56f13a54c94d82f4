"""Tests of elim.losses against explicit NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elim.losses import ccc, elim_loss, pcc, regression_loss, warmup_ramp


def _np_pcc(x, y):
    dx, dy = x - x.mean(), y - y.mean()
    return np.mean(dx * dy) / (np.std(x) * np.std(y))


def _np_ccc(x, y):
    return (
        2
        * np.std(x)
        * np.std(y)
        * _np_pcc(x, y)
        / (np.var(x) + np.var(y) + (x.mean() - y.mean()) ** 2)
    )


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(20, 2, generator=g, dtype=torch.float64) * 2 - 1
    pred = 0.6 * target + 0.3 * torch.rand(20, 2, generator=g, dtype=torch.float64) + 0.1
    return pred, target


def test_pcc_ccc_match_numpy(pair):
    pred, target = pair
    p, t = pred.numpy(), target.numpy()
    for k in range(2):
        assert pcc(pred, target)[k].item() == pytest.approx(_np_pcc(p[:, k], t[:, k]), abs=1e-6)
        assert ccc(pred, target)[k].item() == pytest.approx(_np_ccc(p[:, k], t[:, k]), abs=1e-6)


def test_regression_loss_matches_reference_formula(pair):
    pred, target = pair
    p, t = pred.numpy(), target.numpy()
    mse_v, mse_a = np.mean((p[:, 0] - t[:, 0]) ** 2), np.mean((p[:, 1] - t[:, 1]) ** 2)
    l_pcc = 1 - (_np_pcc(p[:, 0], t[:, 0]) + _np_pcc(p[:, 1], t[:, 1])) / 2
    l_ccc = 1 - (_np_ccc(p[:, 0], t[:, 0]) + _np_ccc(p[:, 1], t[:, 1])) / 2
    expected = mse_v + mse_a + 0.5 * (l_pcc + l_ccc)
    assert regression_loss(pred, target).item() == pytest.approx(expected, abs=1e-6)
    assert regression_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_regression_loss_finite_gradient_for_constant_prediction():
    pred = torch.zeros(8, 2, requires_grad=True)
    target = torch.rand(8, 2)
    loss = regression_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match="pred"):
        regression_loss(torch.zeros(4, 3), torch.zeros(4, 3))


def test_warmup_ramp():
    assert [warmup_ramp(s) for s in range(5)] == [0.0] * 5
    assert warmup_ramp(5) == pytest.approx(0.1)
    assert warmup_ramp(49) == pytest.approx(0.98)
    assert warmup_ramp(50) == 1.0 and warmup_ramp(10_000) == 1.0


def _padded(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 4, 5, generator=g)
    y = torch.randn(3, 4, 2, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    z[~mask] = 123.0  # padding must be ignored
    y[~mask] = -50.0
    return z, y, mask


@pytest.mark.parametrize("per_domain", [True, False])
def test_elim_loss_is_half_ramp_sum_of_domain_mses(per_domain):
    torch.manual_seed(0)
    proj = torch.nn.Linear(5, 2)
    z, y, mask = _padded()
    expected = sum(torch.mean((proj(z[e][mask[e]]) - y[e][mask[e]]) ** 2) for e in range(3))
    got = elim_loss(proj, z, y, mask, ramp=0.4, per_domain=per_domain)
    torch.testing.assert_close(got, 0.5 * 0.4 * expected)
    assert elim_loss(proj, z, y, mask, ramp=0.0, per_domain=per_domain).item() == 0.0


def test_elim_loss_per_domain_batchnorm_handles_singletons():
    from elim.models import Projector

    torch.manual_seed(0)
    proj = Projector(5).train()
    z, y, mask = _padded()  # domain 2 has a single sample
    loss = elim_loss(proj, z, y, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in proj.parameters())
    # per-domain BatchNorm statistics differ from one pooled call
    assert not torch.allclose(loss, elim_loss(proj, z, y, mask, per_domain=False))
    with pytest.raises(ValueError, match="mask"):
        elim_loss(proj, z, y, torch.zeros(3, 4, dtype=torch.bool))
