"""Tests of elim.matching: grouping, Gumbel top-k, cost/weights, batched OT shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elim.attention import ELIMAttention
from elim.matching import (
    MatchingConfig,
    choose_domains,
    elim_matching_step,
    group_by_domain,
    gumbel_topk,
    ot_id_shift,
    pairwise_cost,
    relevance_weights,
    shift_and_normalize,
)

import sinkhorn_ot

D = 6


def _batch(sizes, seed=0, dtype=torch.float64, positive=True):
    """Features, labels and integer domain ids for domains of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    b = sum(sizes)
    z = torch.rand(b, D, generator=g, dtype=dtype)
    if not positive:
        z = z - 0.3
    y = torch.rand(b, 2, generator=g, dtype=dtype) * 2 - 1
    ids = torch.cat([torch.full((n,), 10 * (k + 1)) for k, n in enumerate(sizes)])
    perm = torch.randperm(b, generator=g)  # interleave domains inside the batch
    return z[perm], y[perm], ids[perm]


def _padded_targets(sizes, seed=1, pad_value=0.0):
    g = torch.Generator().manual_seed(seed)
    m = max(sizes)
    tgt = torch.full((len(sizes), m, D), pad_value, dtype=torch.float64)
    mask = torch.zeros(len(sizes), m, dtype=torch.bool)
    for t, n in enumerate(sizes):
        tgt[t, :n] = torch.rand(n, D, generator=g, dtype=torch.float64)
        mask[t, :n] = True
    return tgt, mask


class SolverSpy:
    """Wraps sinkhorn_ot.sinkhorn, recording every call's arguments."""

    def __init__(self):
        self.calls = []
        self._real = sinkhorn_ot.sinkhorn

    def __call__(self, C, a=None, b=None, **kw):
        self.calls.append((C.clone(), a.clone(), b.clone(), kw))
        return self._real(C, a, b, **kw)


@pytest.fixture
def spy(monkeypatch):
    s = SolverSpy()
    monkeypatch.setattr(sinkhorn_ot, "sinkhorn", s)
    return s


# --------------------------------------------------------------------------- NumPy reference


def _np_algorithm1(M, a, b, eta_inv=5.0, T=5):
    """Appendix Algorithm 1, literally: K = exp(-lambda M), K~ = diag(1/a) K, u0 = 1/n."""
    n = M.shape[0]
    K = np.exp(-eta_inv * M)
    K_tilde = np.diag(1.0 / a) @ K
    u = np.ones(n) / n
    for _ in range(T):
        u = 1.0 / (K_tilde @ (b / (K.T @ u)))
    v = b / (K.T @ u)
    return np.diag(u) @ K @ np.diag(v)


def _np_reference_step(z_ref, z_tgts, shift="vector"):
    """Reference §2 step 2 for one reference and a list of target sets, pair by pair."""
    mean_ref = z_ref.mean(0)
    shifts, z_hats = [], []
    for z_t in z_tgts:
        n, m = len(z_ref), len(z_t)
        M = np.zeros((n, m))
        for i in range(n):
            for j in range(m):
                cos = z_ref[i] @ z_t[j] / (np.linalg.norm(z_ref[i]) * np.linalg.norm(z_t[j]))
                M[i, j] = 1.0 - cos
        a = np.array([max(z_ref[i] @ z_t.mean(0), 0.0) for i in range(n)])
        b = np.array([max(z_t[j] @ mean_ref, 0.0) for j in range(m)])
        a, b = m * a / a.sum(), m * b / b.sum()  # both sum to the target set size
        X = _np_algorithm1(M, a, b)
        mu = np.array([sum(X[i, j] * M[i, j] for i in range(n)) for j in range(m)])
        if shift == "scalar":
            mu = np.full(m, mu[0])
        z_hat = np.empty_like(z_t)
        for j in range(m):
            d = z_t[j] - mu[j]
            z_hat[j] = d / (np.sqrt(np.mean(d**2)) + 1e-6)
        shifts.append(mu)
        z_hats.append(z_hat)
    return shifts, z_hats


# --------------------------------------------------------------------------- grouping


def test_group_by_domain_tensor_ids_keeps_batch_order():
    z = torch.arange(12.0).reshape(6, 2)
    y = torch.zeros(6, 2)
    groups = group_by_domain(z, y, torch.tensor([7, 3, 7, 3, 9, 7]))
    assert groups.ids == [3, 7, 9]
    assert [i.tolist() for i in groups.indices] == [[1, 3], [0, 2, 5], [4]]
    assert torch.equal(groups.features[1], z[[0, 2, 5]])


def test_group_by_domain_string_ids_and_errors():
    groups = group_by_domain(torch.zeros(3, 2), torch.zeros(3, 2), ["x/1.jpg", "a", "x/1.jpg"])
    assert groups.ids == ["a", "x/1.jpg"]
    assert [i.tolist() for i in groups.indices] == [[1], [0, 2]]
    with pytest.raises(ValueError, match="domain_ids"):
        group_by_domain(torch.zeros(3, 2), torch.zeros(3, 2), ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        group_by_domain(torch.zeros(3, 2), torch.zeros(3, 3), [0, 1, 2])


def test_choose_domains_seeded_distinct_and_capped():
    a = choose_domains(20, 10, torch.Generator().manual_seed(3))
    b = choose_domains(20, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 10
    assert sorted(choose_domains(4, 10, torch.Generator().manual_seed(0)).tolist()) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- Gumbel top-k


def test_gumbel_topk_keeps_all_when_fewer_than_k():
    labels = torch.rand(3, 5, 2)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = gumbel_topk(labels, mask, k=3, generator=torch.Generator().manual_seed(0))
    assert out.keep.sum(1).tolist() == [2, 3, 1]
    assert not bool((out.keep & ~mask).any())  # padding is never selected
    assert torch.equal(out.keep[0], mask[0]) and torch.equal(out.keep[2], mask[2])
    # k larger than the padded width too
    out = gumbel_topk(labels, mask, k=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.keep, mask)


def test_gumbel_topk_zero_norm_labels_no_nan_and_lowest_priority():
    labels = torch.zeros(2, 4, 2)
    labels[0, 2] = torch.tensor([0.6, -0.8])  # the only non-zero label of domain 0
    mask = torch.ones(2, 4, dtype=torch.bool)  # domain 1: all labels zero
    for seed in range(5):
        out = gumbel_topk(labels, mask, k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(out.probs).all()
        assert out.keep[0].nonzero().flatten().tolist() == [2]
        assert out.keep[1].sum() == 1  # an all-zero domain is still sampled
    assert torch.allclose(out.probs.sum(1), torch.ones(2))


def test_gumbel_topk_favours_large_labels_statistically():
    labels = torch.tensor([[[0.05, 0.0], [0.9, 0.0], [0.05, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hits = sum(int(gumbel_topk(labels, mask, 1, g).keep[0, 1]) for _ in range(200))
    assert hits > 150  # p = 0.9 for the large label


# --------------------------------------------------------------------------- cost and weights


def test_pairwise_cost_matches_numpy_and_zero_pads():
    ref = torch.rand(4, D, dtype=torch.float64) - 0.5
    tgt, mask = _padded_targets([3, 1, 2])
    C = pairwise_cost(ref, tgt, mask)
    assert C.shape == (3, 4, 3)
    r, t = ref.numpy(), tgt.numpy()
    for k, n in enumerate([3, 1, 2]):
        cos = (r @ t[k, :n].T) / np.outer(
            np.linalg.norm(r, axis=1), np.linalg.norm(t[k, :n], axis=1)
        )
        np.testing.assert_allclose(C[k, :, :n].numpy(), 1 - cos, atol=1e-12)
        assert bool((C[k, :, n:] == 0).all())


@pytest.mark.parametrize("mass", ["target", "unit", "reference"])
def test_relevance_weights_equal_mass_and_shapes(mass):
    ref = torch.rand(4, D, dtype=torch.float64)
    tgt, mask = _padded_targets([3, 1, 2])
    a, b = relevance_weights(ref, tgt, mask, mass)
    assert a.shape == (3, 4) and b.shape == (3, 3)
    expected = {"target": [3.0, 1.0, 2.0], "unit": [1.0] * 3, "reference": [4.0] * 3}[mass]
    np.testing.assert_allclose(a.sum(1).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(b.sum(1).numpy(), expected, rtol=1e-12)
    assert bool((b[~mask] == 0).all()) and bool((a >= 0).all())
    # proportional to the ReLU scores
    raw = torch.relu(tgt[0, :3] @ ref.mean(0))
    np.testing.assert_allclose(b[0, :3].numpy(), (raw / raw.sum() * a[0].sum()).numpy(), rtol=1e-12)


def test_relevance_weights_all_zero_falls_back_to_uniform():
    ref = torch.rand(3, D, dtype=torch.float64)
    tgt = -torch.rand(2, 4, D, dtype=torch.float64)  # every dot product negative: ReLU -> 0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    a, b = relevance_weights(ref, tgt, mask)
    np.testing.assert_allclose(a.numpy(), [[4 / 3] * 3, [2 / 3] * 3], rtol=1e-12)
    np.testing.assert_allclose(b.numpy(), [[1, 1, 1, 1], [1, 1, 0, 0]], rtol=1e-12)


# --------------------------------------------------------------------------- normalisation


def test_shift_and_normalize_formula_broadcast_and_finite_grad():
    z = torch.randn(3, 2, D, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(3, 2, dtype=torch.float64)
    out = shift_and_normalize(z, mu)
    d = z.detach() - mu.unsqueeze(-1)
    expected = d / (d.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # a row equal to its shift: value 0 and a finite gradient
    zc = torch.full((1, D), 0.3, dtype=torch.float64, requires_grad=True)
    outc = shift_and_normalize(zc, torch.tensor([0.3], dtype=torch.float64))
    outc.sum().backward()
    assert bool((outc == 0).all()) and torch.isfinite(zc.grad).all()
    with pytest.raises(ValueError, match="mu"):
        shift_and_normalize(z, mu[:, :1])


# --------------------------------------------------------------------------- OT shift


def test_elim_step_matches_numpy_transcription_of_reference(spy):
    sizes = [4, 3, 5, 2]
    z, y, ids = _batch(sizes)
    for shift in ("vector", "scalar"):
        cfg = MatchingConfig(num_domains=4, top_k=None, shift=shift)
        out = elim_matching_step(z, y, ids, cfg, torch.Generator().manual_seed(0))
        sets = [z[ids == d].numpy() for d in out.domain_ids]
        labels = [y[ids == d].numpy() for d in out.domain_ids]
        mu_np, zhat_np = _np_reference_step(sets[0], sets[1:], shift)
        n_ref = len(sets[0])
        np.testing.assert_allclose(out.features[0, :n_ref].numpy(), sets[0], atol=1e-12)
        np.testing.assert_allclose(out.labels[0, :n_ref].numpy(), labels[0], atol=1e-12)
        for t in range(len(sets) - 1):
            m = len(sets[t + 1])
            np.testing.assert_allclose(out.shift[t, :m].numpy(), mu_np[t], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(out.features[t + 1, :m].numpy(), zhat_np[t], atol=1e-9)
            np.testing.assert_allclose(out.labels[t + 1, :m].numpy(), labels[t + 1], atol=1e-12)
            assert bool((out.shift[t, m:] == 0).all())
    assert len(spy.calls) == 2  # one solver call per step


def test_one_batched_solver_call_in_pad_batch_layout(spy):
    z, y, ids = _batch([3, 5, 2, 4, 1, 6], seed=2)
    cfg = MatchingConfig(num_domains=5, top_k=4)
    out = elim_matching_step(z, y, ids, cfg, torch.Generator().manual_seed(1))
    assert len(spy.calls) == 1
    C, a, b, kw = spy.calls[0]
    assert C.shape[0] == 4  # every (reference, target) pair in one batch
    assert kw["method"] == "kernel" and kw["max_iter"] == 5 and kw["tol"] is None
    assert kw["eps"] == pytest.approx(0.2)
    # identical to pad_batch applied to the unpadded per-pair problems
    counts = out.mask[1:].sum(1).tolist()
    C_pb, a_pb, b_pb = sinkhorn_ot.pad_batch(
        [C[t, :, :m] for t, m in enumerate(counts)],
        [a[t] for t in range(len(counts))],
        [b[t, :m] for t, m in enumerate(counts)],
    )
    assert torch.equal(C, C_pb) and torch.equal(a, a_pb) and torch.equal(b, b_pb)


@pytest.mark.parametrize("config", [MatchingConfig.paper(), MatchingConfig.converged()])
def test_ot_id_shift_padded_equals_unpadded(config):
    ref = torch.rand(5, D, dtype=torch.float64)
    sizes = [4, 1, 3]
    tgt, mask = _padded_targets(sizes, pad_value=0.0)
    tgt_junk, _ = _padded_targets(sizes, pad_value=7.5)  # different padded values
    mu = ot_id_shift(ref, tgt, mask, config)
    mu_junk = ot_id_shift(ref, tgt_junk, mask, config)
    torch.testing.assert_close(mu, mu_junk, rtol=0, atol=1e-12)
    for t, m in enumerate(sizes):
        alone = ot_id_shift(ref, tgt[t : t + 1, :m], mask[t : t + 1, :m], config)
        torch.testing.assert_close(mu[t, :m], alone[0], rtol=1e-6, atol=1e-9)
        assert bool((mu[t, m:] == 0).all())


def test_converged_config_runs_to_tolerance(spy):
    z, y, ids = _batch([4, 3, 5], seed=4)
    cfg = MatchingConfig.converged(num_domains=3, top_k=None)
    out = elim_matching_step(z, y, ids, cfg, torch.Generator().manual_seed(0))
    kw = spy.calls[0][3]
    assert kw["method"] == "log" and kw["tol"] == 1e-5 and kw["max_iter"] == 1000
    assert torch.isfinite(out.shift).all() and bool((out.shift[out.mask[1:]] > 0).all())


def test_no_nan_with_zero_features_and_labels():
    z, y, ids = _batch([3, 4, 2], seed=5, dtype=torch.float32, positive=False)
    z = z.clone()
    z[:3] = 0.0  # dead post-ReLU features: zero weights and zero cosine
    y = y.clone()
    y[ids == ids[0]] = 0.0  # a domain of zero labels (log 0 in Gumbel sampling)
    z.requires_grad_(True)
    out = elim_matching_step(z, y, ids, MatchingConfig(top_k=2), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.features).all() and torch.isfinite(out.shift).all()
    (out.features.pow(2).sum() + out.features.sum()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_elim_step_output_layout_and_reproducibility():
    z, y, ids = _batch([5, 1, 4, 3], seed=6)
    cfg = MatchingConfig(num_domains=3, top_k=3)
    a = elim_matching_step(z, y, ids, cfg, torch.Generator().manual_seed(9))
    b = elim_matching_step(z, y, ids, cfg, torch.Generator().manual_seed(9))
    assert torch.equal(a.features, b.features) and a.domain_ids == b.domain_ids
    assert a.features.shape[0] == 3 and a.mask.shape == a.features.shape[:2]
    counts = a.mask.sum(1)
    sizes = {10: 5, 20: 1, 30: 4, 40: 3}
    assert counts.tolist() == [min(3, sizes[d]) for d in a.domain_ids]
    # real samples first, and indices point at the right domain
    for e, d in enumerate(a.domain_ids):
        n = int(counts[e])
        assert bool(a.mask[e, :n].all()) and not bool(a.mask[e, n:].any())
        assert bool((ids[a.indices[e, :n]] == d).all())
    assert bool((a.features[~a.mask] == 0).all())


def test_single_domain_returns_none():
    z, y = torch.rand(4, D), torch.rand(4, 2)
    assert elim_matching_step(z, y, torch.zeros(4, dtype=torch.long)) is None


def test_attention_replaces_ot_shift(spy):
    torch.manual_seed(0)
    z, y, ids = _batch([4, 3, 5], seed=7, dtype=torch.float32)
    att = ELIMAttention(D, num_heads=2)
    out = elim_matching_step(
        z, y, ids, MatchingConfig(num_domains=3, top_k=None), torch.Generator(), attention=att
    )
    assert len(spy.calls) == 0
    assert out.shift.requires_grad  # the attention module must receive a gradient
    out.features[1:].sum().backward()
    assert att.fc.weight.grad is not None and att.fc.weight.grad.abs().sum() > 0


def test_config_validation_names_argument():
    with pytest.raises(ValueError, match="shift"):
        MatchingConfig(shift="matrix")
    with pytest.raises(ValueError, match="num_domains"):
        MatchingConfig(num_domains=1)
    with pytest.raises(ValueError, match="top_k"):
        MatchingConfig(top_k=0)
    assert MatchingConfig.converged(shift="scalar").shift == "scalar"
