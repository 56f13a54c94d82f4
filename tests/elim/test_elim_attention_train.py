"""ELIM-Attention wired into training: size, optimiser, gradients, checkpoint and resume."""

from __future__ import annotations

import pytest
import torch
from elim import checkpoint
from elim.attention import ELIMAttention
from elim.config import TrainConfig, matching_config
from elim.models import ELIMModel, Projector, build_model, build_optimizers
from test_train_components import TinyEncoder, train_step
from test_train_helpers import run_train, tiny_config, write_config

D = 6  # TinyEncoder's feature size


def _expected_parameter_count(d: int) -> int:
    """From the layer shapes of appendix §4.3, not from the module."""
    mha = 3 * d * d + 3 * d + d * d + d  # packed q/k/v projection (+ bias), output projection
    layer_norm = 2 * d  # weight and bias
    fc = d + 1  # D -> 1 weight per target sample
    return 2 * mha + 2 * layer_norm + fc


def test_parameter_count_at_d64_matches_the_layer_shapes_and_is_below_100k():
    cfg = TrainConfig(method="elim-attention", backbone="resnet18", feature_dim=64)
    attention = build_model(cfg).attention
    count = sum(p.numel() for p in attention.parameters())
    assert count == _expected_parameter_count(64) == 2 * (4 * 64**2 + 4 * 64) + 2 * 128 + 65
    assert count < 100_000
    assert build_model(TrainConfig(backbone="resnet18", feature_dim=64)).attention is None


def test_attention_gets_its_own_adam_with_the_documented_lr():
    cfg = TrainConfig(
        method="elim-attention", feature_dim=D, attention_heads=2, lr=2e-3, attention_lr_mult=0.5
    )
    torch.manual_seed(0)
    model = ELIMModel(TinyEncoder(), Projector(D), ELIMAttention(D, num_heads=2))
    opt = build_optimizers(model, cfg)
    assert set(opt.named()) == {"encoder", "projector", "attention"}
    assert set(opt.schedulers) == {"encoder", "projector", "attention"}
    assert opt.attention.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5)
    ids = {id(p) for p in opt.attention.param_groups[0]["params"]}
    assert ids == {id(p) for p in model.attention.parameters()}


@pytest.mark.parametrize("update", ["two-step", "combined"])
def test_one_step_trains_the_attention_module(update):
    cfg = TrainConfig(
        method="elim-attention",
        feature_dim=D,
        attention_heads=2,
        ramp_start=0,
        ramp_end=1,
        num_domains=4,
        top_k=2,
        update=update,
    )
    torch.manual_seed(0)
    model = ELIMModel(TinyEncoder(), Projector(D), ELIMAttention(D, num_heads=2))
    opt = build_optimizers(model, cfg)
    before = {k: v.clone() for k, v in model.attention.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 12, 12, generator=g), torch.rand(12, 2, generator=g) * 2 - 1
    ids = torch.arange(4).repeat_interleave(3)
    # step 1: ramp 1, so the ELIM loss (and hence the attention weights) is used.
    record = train_step(model, opt, x, y, ids, 1, cfg, matching_config(cfg), torch.Generator())
    assert record["loss_elim"] > 0 and record["n_domains"] == 4
    grads = [p.grad for p in model.attention.parameters()]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)
    changed = [k for k, v in model.attention.state_dict().items() if not torch.equal(v, before[k])]
    assert "fc.weight" in changed and "cross_attn.in_proj_weight" in changed
    assert all(int(s["step"]) == 1 for s in opt.attention.state.values())


def test_baseline_step_leaves_attention_untouched():
    """Sanity of the test above: the same step without ELIM does not move the module."""
    cfg = TrainConfig(method="elim-attention", feature_dim=D, attention_heads=2, ramp_start=5)
    torch.manual_seed(0)
    model = ELIMModel(TinyEncoder(), Projector(D), ELIMAttention(D, num_heads=2))
    opt = build_optimizers(model, cfg)
    before = {k: v.clone() for k, v in model.attention.state_dict().items()}
    x, y, ids = torch.randn(12, 3, 12, 12), torch.rand(12, 2), torch.arange(4).repeat_interleave(3)
    record = train_step(model, opt, x, y, ids, 0, cfg, matching_config(cfg), torch.Generator())
    assert record["loss_elim"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.attention.state_dict().items())


def test_heads_must_divide_the_feature_size_only_for_elim_attention():
    with pytest.raises(ValueError, match=r"`attention_heads`.*feature_dim \(6\), got 4"):
        TrainConfig(method="elim-attention", feature_dim=6, attention_heads=4)
    assert TrainConfig(method="elim", feature_dim=6, attention_heads=4).feature_dim == 6
    with pytest.raises(ValueError, match="`attention_lr_mult` must be > 0"):
        TrainConfig(attention_lr_mult=0.0)


def test_checkpoint_holds_the_attention_and_resume_is_exact(tmp_path):
    cfg = write_config(
        tmp_path / "cfg.json",
        tiny_config(tmp_path / "data", backbone="resnet18", method="elim-attention"),
    )
    reference, resumed = tmp_path / "ref", tmp_path / "resumed"
    run_train(["--config", str(cfg), "--out", str(reference), "--max-steps", "4"])
    run_train(["--config", str(cfg), "--out", str(resumed)])  # 2 steps, checkpoint
    half = checkpoint.load(resumed / checkpoint.CHECKPOINT_NAME)
    assert any(k.startswith("attention.") for k in half["model"])
    assert "attention" in half["optimizers"] and "attention" in half["schedulers"]
    run_train(["--config", str(cfg), "--out", str(resumed), "--resume", "--max-steps", "4"])
    a = checkpoint.load(resumed / checkpoint.CHECKPOINT_NAME)
    b = checkpoint.load(reference / checkpoint.CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 4
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    att_a, att_b = a["optimizers"]["attention"]["state"], b["optimizers"]["attention"]["state"]
    assert att_a.keys() == att_b.keys() and len(att_a) > 0
    for i in att_b:
        assert torch.equal(att_a[i]["exp_avg"], att_b[i]["exp_avg"])
