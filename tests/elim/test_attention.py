"""Tests of elim.attention.ELIMAttention."""

from __future__ import annotations

import pytest
import torch
from elim.attention import ELIMAttention

D = 16


def _sets(sizes, pad_value=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = max(sizes)
    x = torch.full((len(sizes), m, D), pad_value)
    mask = torch.zeros(len(sizes), m, dtype=torch.bool)
    for t, n in enumerate(sizes):
        x[t, :n] = torch.randn(n, D, generator=g)
        mask[t, :n] = True
    return x, mask


@pytest.fixture
def att():
    torch.manual_seed(0)
    return ELIMAttention(D, num_heads=4).eval()


def test_parameter_count_below_100k_at_d64():
    n = sum(p.numel() for p in ELIMAttention(64).parameters())
    assert n == 33_601 and n < 100_000


def test_shape_and_zero_at_padding(att):
    ref = torch.randn(5, D)
    tgt, mask = _sets([4, 2, 1])
    w = att(ref, tgt, mask)
    assert w.shape == (3, 4)
    assert bool((w[~mask] == 0).all()) and bool((w[mask] != 0).all())


def test_padded_values_do_not_change_valid_outputs(att):
    ref = torch.randn(5, D)
    tgt, mask = _sets([4, 2, 1])
    junk, _ = _sets([4, 2, 1], pad_value=1e4)
    junk[1, 3] = float("inf")  # even non-finite padding is harmless
    with torch.no_grad():
        torch.testing.assert_close(att(ref, tgt, mask), att(ref, junk, mask))


def test_batched_equals_one_target_at_a_time(att):
    ref = torch.randn(5, D)
    sizes = [4, 2, 3]
    tgt, mask = _sets(sizes)
    with torch.no_grad():
        w = att(ref, tgt, mask)
        for t, m in enumerate(sizes):
            alone = att(ref, tgt[t : t + 1, :m])
            torch.testing.assert_close(w[t, :m], alone[0], rtol=1e-5, atol=1e-6)


def test_padded_per_target_reference_matches_shared_reference(att):
    ref = torch.randn(3, D)
    tgt, mask = _sets([2, 3])
    ref_pad = torch.zeros(2, 5, D)
    ref_pad[:, :3] = ref
    ref_pad[0, 3:] = 99.0  # padding
    ref_mask = torch.zeros(2, 5, dtype=torch.bool)
    ref_mask[:, :3] = True
    with torch.no_grad():
        torch.testing.assert_close(
            att(ref, tgt, mask), att(ref_pad, tgt, mask, ref_mask), rtol=1e-5, atol=1e-6
        )


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    att = ELIMAttention(D, num_heads=2).train()
    tgt, mask = _sets([3, 2])
    att(torch.randn(4, D), tgt, mask).pow(2).sum().backward()
    for name, p in att.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_errors_name_the_argument(att):
    tgt, mask = _sets([2, 2])
    with pytest.raises(ValueError, match="target_mask"):
        att(torch.randn(3, D), tgt, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets"):
        att(torch.randn(3, D), torch.randn(2, 2, D + 1), mask)
    with pytest.raises(ValueError, match="num_heads"):
        ELIMAttention(10, num_heads=4)
