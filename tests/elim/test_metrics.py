"""Tests of elim.metrics against independent NumPy/SciPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elim.metrics import ccc, pcc, rmse, sagr, va_metrics
from scipy.stats import pearsonr


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    target = np.round(rng.uniform(-1, 1, size=(200, 2)), 1)  # AFEW-VA-like, with zeros
    pred = 0.7 * target + rng.normal(0.05, 0.2, size=target.shape)
    pred[:3] = 0.0  # exact-zero predictions meet some zero labels
    return pred, target


def _ccc_explicit(p, t):
    # appendix §3 with population moments: 2 s_t s_p PCC / (s_t^2 + s_p^2 + (m_t - m_p)^2)
    s_p, s_t = np.std(p), np.std(t)
    r = pearsonr(t, p)[0]
    return 2 * s_t * s_p * r / (s_t**2 + s_p**2 + (t.mean() - p.mean()) ** 2)


def test_each_metric_matches_independent_formula(data):
    pred, target = data
    for k in range(2):
        p, t = pred[:, k], target[:, k]
        assert rmse(p, t) == pytest.approx(np.sqrt(np.mean((t - p) ** 2)), abs=1e-6)
        assert pcc(p, t) == pytest.approx(pearsonr(t, p)[0], abs=1e-6)
        assert ccc(p, t) == pytest.approx(_ccc_explicit(p, t), abs=1e-6)
        agree = [
            (ti > 0 and pi > 0) or (ti < 0 and pi < 0) or (ti == 0 and pi == 0)
            for pi, ti in zip(p, t)
        ]
        assert sagr(p, t) == pytest.approx(np.mean(agree), abs=1e-12)


def test_va_metrics_keys_columns_and_tensor_input(data):
    pred, target = data
    m = va_metrics(pred, target)
    assert set(m) == {"rmse_v", "rmse_a", "sagr_v", "sagr_a", "pcc_v", "pcc_a", "ccc_v", "ccc_a"}
    assert m["pcc_a"] == pytest.approx(pearsonr(target[:, 1], pred[:, 1])[0], abs=1e-6)
    assert m["rmse_v"] == pytest.approx(rmse(pred[:, 0], target[:, 0]), abs=0)
    assert all(isinstance(v, float) for v in m.values())
    m_t = va_metrics(torch.tensor(pred, dtype=torch.float32), torch.tensor(target))
    assert m_t["ccc_v"] == pytest.approx(m["ccc_v"], abs=1e-6)


def test_whole_set_not_batch_average(data):
    pred, target = data
    batch_mean = np.mean(
        [rmse(pred[i : i + 50, 0], target[i : i + 50, 0]) for i in range(0, 200, 50)]
    )
    assert rmse(pred[:, 0], target[:, 0]) != pytest.approx(batch_mean, abs=1e-9)


def test_sagr_zero_convention():
    assert sagr([0.0, 0.1, -0.1], [0.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert sagr([0.2, -0.3], [0.5, -0.1]) == 1.0


def test_degenerate_inputs():
    const = np.full(5, 0.3)
    y = np.array([0.1, -0.2, 0.4, 0.0, 0.3])
    assert pcc(const, y) == 0.0
    assert ccc(const, y) == pytest.approx(0.0, abs=1e-12)
    assert ccc(const, const) == 1.0
    with pytest.raises(ValueError, match="pred"):
        va_metrics(np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="target"):
        rmse(np.zeros(3), np.zeros(4))
