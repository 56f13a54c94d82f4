"""The pieces of a training run: augmentation, matching settings, one training step
(train.py's ``train_step``), evaluation, the data pipeline and the logs."""

from __future__ import annotations

import copy
import doctest
import json

import elim.data.pipeline
import numpy as np
import pytest
import torch
from elim.checkpoint import read_jsonl, truncate_jsonl
from elim.config import TrainConfig, matching_config
from elim.data.base import augment, normalize
from elim.data.pipeline import Batches, batch_layout, make_sampler, preload, should_cache
from elim.matching import MatchingConfig
from elim.metrics import evaluate, identity_share, va_metrics
from elim.models import ELIMModel, Projector, build_optimizers
from test_train_helpers import load_train_module
from torch import nn

import sinkhorn_ot

D = 6
train_step = load_train_module().train_step


class TinyEncoder(nn.Module):
    """A small conv encoder with BatchNorm and dropout, like the real backbones."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(16, D),
            nn.BatchNorm1d(D),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)


def _model(seed=0):
    torch.manual_seed(seed)
    return ELIMModel(TinyEncoder(), Projector(D))


def _batch(p=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p * k, 3, 12, 12, generator=g)
    y = torch.rand(p * k, 2, generator=g) * 2 - 1
    ids = torch.arange(p).repeat_interleave(k)
    return x, y, ids


def _cfg(**kw):
    base = dict(ramp_start=0, ramp_end=1, num_domains=4, top_k=2, feature_dim=D)
    return TrainConfig(**{**base, **kw})


def _adam_steps(opt):
    return [int(s["step"]) for s in opt.state.values()]


# ----------------------------------------------------------------------------- augmentation


def test_augment_returns_crops_of_the_input_and_flips_some():
    images = torch.arange(16 * 3 * 9 * 9, dtype=torch.int64).reshape(16, 3, 9, 9)
    out = augment(images, 5, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 5, 5) and out.dtype == images.dtype
    flipped = 0
    for src, crop in zip(images, out):
        found = None
        for top in range(5):
            for left in range(5):
                patch = src[:, top : top + 5, left : left + 5]
                if torch.equal(patch, crop):
                    found = "plain"
                elif torch.equal(patch.flip(-1), crop):
                    found = "flipped"
        assert found is not None, "every output must be a (possibly flipped) crop"
        flipped += found == "flipped"
    assert 0 < flipped < 16


def test_augment_is_a_pure_function_of_the_generator():
    images = torch.randint(0, 255, (8, 3, 10, 10), dtype=torch.uint8)
    a = augment(images, 8, torch.Generator().manual_seed(3))
    b = augment(images, 8, torch.Generator().manual_seed(3))
    c = augment(images, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_flip = augment(images, 10, torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(no_flip, images)  # full-size crop without flip is the identity
    with pytest.raises(ValueError, match="cannot be cropped"):
        augment(images, 11, torch.Generator())


def test_normalize_uses_imagenet_statistics():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


# ----------------------------------------------------------------------------- matching settings


def test_matching_config_paper_and_converged():
    paper = matching_config(TrainConfig())
    assert (paper.method, paper.max_iter, paper.tol, paper.eps) == ("kernel", 5, None, 0.2)
    assert paper.detach_shift and paper.grad == "none" and paper.backend == "auto"
    assert paper.num_domains == 10 and paper.top_k == 10
    conv = matching_config(TrainConfig(sinkhorn="converged", ot_tol=1e-4, top_k=0))
    assert (conv.method, conv.max_iter, conv.tol, conv.top_k) == ("log", 1000, 1e-4, None)
    scalar = matching_config(TrainConfig(shift="scalar", ot_iters=9, ot_grad="unroll"))
    assert scalar.shift == "scalar" and scalar.max_iter == 9
    assert scalar.grad == "unroll" and not scalar.detach_shift  # a gradient mode un-detaches


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize(
    ("method", "update", "encoder_steps"),
    [("baseline", "two-step", 1), ("elim", "two-step", 2), ("elim", "combined", 1)],
)
def test_optimiser_steps_per_iteration(method, update, encoder_steps):
    model = _model()
    cfg = _cfg(method=method, update=update)
    opt = build_optimizers(model, cfg)
    x, y, ids = _batch()
    record = train_step(model, opt, x, y, ids, 3, cfg, matching_config(cfg), torch.Generator())
    assert set(_adam_steps(opt.encoder)) == {encoder_steps}
    assert set(_adam_steps(opt.projector)) == {encoder_steps}
    assert np.isfinite(record["loss_main"])
    if method == "elim":
        assert record["loss_elim"] > 0 and record["ramp"] == 1.0
        assert record["n_domains"] == 4.0 and record["shift_mean"] > 0
    else:
        assert record["loss_elim"] == 0.0 and "shift_mean" not in record


def test_elim_during_warmup_is_exactly_the_baseline_step():
    x, y, ids = _batch()
    states = []
    for method in ("baseline", "elim"):
        model = _model(seed=1)
        cfg = _cfg(method=method, ramp_start=5, ramp_end=10)
        opt = build_optimizers(model, cfg)
        torch.manual_seed(7)  # dropout
        record = train_step(model, opt, x, y, ids, 2, cfg, matching_config(cfg), torch.Generator())
        assert record["loss_elim"] == 0.0 and record["ramp"] == 0.0
        states.append(copy.deepcopy(model.state_dict()))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_elim_step_clips_the_encoder_gradient():
    model = _model()
    cfg = _cfg(method="elim", update="combined", clip_grad=1e-3)
    opt = build_optimizers(model, cfg)
    x, y, ids = _batch()
    record = train_step(model, opt, x, y, ids, 3, cfg, matching_config(cfg), torch.Generator())
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert record["grad_norm"] > 1e-3  # it needed clipping ...
    assert float(after) <= 1e-3 * 1.0001  # ... and was clipped


def test_elim_step_changes_the_update_and_uses_one_solver_call(monkeypatch):
    calls = []
    real = sinkhorn_ot.sinkhorn

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(sinkhorn_ot, "sinkhorn", spy)
    x, y, ids = _batch(p=5, k=4)
    params = {}
    for method in ("baseline", "elim"):
        model = _model(seed=2)
        cfg = _cfg(method=method, num_domains=5, top_k=3)
        opt = build_optimizers(model, cfg)
        torch.manual_seed(0)
        train_step(model, opt, x, y, ids, 3, cfg, matching_config(cfg), torch.Generator())
        params[method] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert calls == [torch.Size([4, 3, 3])]  # 4 targets x (3 ref, 3 target) samples, ONE call
    assert not torch.equal(params["baseline"], params["elim"])


# ----------------------------------------------------------------------------- evaluation


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, ids):
        self.images, self.labels, self.identities = images, labels, ids
        self.domain_kind = "identity"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], int(self.identities[i])


def test_evaluate_covers_the_whole_set_in_eval_mode():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (10, 3, 12, 12), dtype=torch.uint8)
    labels = torch.rand(10, 2) * 2 - 1
    data = _ListDataset(images, labels, torch.zeros(10, dtype=torch.long))
    model = _model().train()
    metrics, pred, true = evaluate(model, data, images, torch.device("cpu"))
    assert model.training, "evaluate must restore the training mode"
    assert torch.equal(true, labels) and pred.shape == (10, 2)
    model.eval()
    with torch.no_grad():
        expected = model(normalize(images))[1]
    torch.testing.assert_close(pred, expected)  # eval mode: no dropout, running BN stats
    assert metrics == va_metrics(expected, labels)
    streamed, pred2, _ = evaluate(model, data, None, torch.device("cpu"))  # DataLoader path
    torch.testing.assert_close(pred2, pred)
    assert streamed == pytest.approx(metrics)


# ----------------------------------------------------------------------------- data plumbing


def test_batches_skip_resumes_inside_an_epoch_and_cache_equals_stream():
    images = torch.randint(0, 255, (24, 3, 4, 4), dtype=torch.uint8)
    labels = torch.rand(24, 2)
    ids = torch.arange(6).repeat_interleave(4)
    data = _ListDataset(images, labels, ids)
    sampler, _ = make_sampler(data, TrainConfig(batch_size=4, samples_per_identity=2), 0, 1)
    sampler.set_epoch(2)
    full = list(Batches(data, sampler, images, workers=0))
    tail = list(Batches(data, sampler, images, workers=0, skip=2))
    streamed = list(Batches(data, sampler, None, workers=0, skip=2))
    assert len(full) == len(sampler) == 6 and len(tail) == 4
    for (xa, ya, da), (xb, yb, db), (xc, yc, dc) in zip(full[2:], tail, streamed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(da, db)
        assert torch.equal(xa, xc) and torch.equal(ya, yc) and torch.equal(da, dc)
    assert all(len(set(d.tolist())) == 2 for _, _, d in full)  # P = 2 identities per batch


def test_image_domains_get_k_equal_one():
    data = _ListDataset(torch.zeros(8, 3, 2, 2), torch.zeros(8, 2), torch.arange(8))
    data.domain_kind = "image"
    sampler, layout = make_sampler(data, TrainConfig(batch_size=4, samples_per_identity=2), 0, 1)
    assert sampler.samples_per_identity == 1 and sampler.identities_per_batch == 4
    assert layout == (4, 1, None)


def test_batch_layout_fits_the_domains_unless_k_is_given():
    cfg = TrainConfig(batch_size=120)
    assert batch_layout(cfg, "identity", 96) == (10, 12, None)
    # Five age groups: the layout with the most domains that fits, and a note saying so.
    domains, k, note = batch_layout(cfg, "age_group", 5)
    assert (domains, k) == (5, 24) and "--samples-per-identity 24" in note
    assert batch_layout(cfg, "age_group", 10, world_size=2)[:2] == (5, 24)
    # An explicit K that needs more domains than exist stays an error naming the flags.
    with pytest.raises(ValueError, match=r"--samples-per-identity 24 \(5 domains x 24"):
        batch_layout(TrainConfig(batch_size=120, samples_per_identity=12), "age_group", 5)
    with pytest.raises(ValueError, match="too few for batches"):
        batch_layout(cfg, "age_group", 1)


def test_preload_disk_cache_round_trip(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text("x\n")
    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    data = _ListDataset(images, torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
    data.source, data.paths, data.transform = src, [f"{i}.png" for i in range(5)], "t"
    first = preload(data, cache_dir=tmp_path / "cache")
    assert torch.equal(first, images)
    assert len(list((tmp_path / "cache").glob("images_*.pt"))) == 1
    data.images = torch.zeros_like(images)  # a cache hit must not read the dataset again
    assert torch.equal(preload(data, cache_dir=tmp_path / "cache"), images)
    data.transform = "other"  # a different transform is a different cache entry
    assert torch.equal(preload(data, cache_dir=tmp_path / "cache"), data.images)


def test_should_cache_auto_threshold():
    assert should_cache("auto", 1000, 64) and not should_cache("auto", 10**6, 256)
    assert should_cache("on", 10**9, 256) and not should_cache("off", 1, 1)


def test_truncate_jsonl_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s * 2}) + "\n" for s in range(1, 6)))
    truncate_jsonl(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_docstring_examples():
    result = doctest.testmod(elim.data.pipeline)
    assert result.attempted > 0 and result.failed == 0


def test_matching_backend_is_passed_to_the_solver(monkeypatch):
    seen = []
    real = sinkhorn_ot.sinkhorn

    def spy(*args, **kw):
        seen.append(kw.get("backend"))
        return real(*args, **kw)

    monkeypatch.setattr(sinkhorn_ot, "sinkhorn", spy)
    from elim.matching import ot_id_shift

    ot_id_shift(
        torch.rand(3, 4),
        torch.rand(2, 3, 4),
        torch.ones(2, 3).bool(),
        MatchingConfig(backend="torch"),
    )
    assert seen == ["torch"]
    with pytest.raises(ValueError, match="backend"):
        MatchingConfig(backend="gpu")


def test_identity_share_separates_shortcut_from_expression():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(8).repeat_interleave(20)
    labels = torch.rand(160, 1, generator=g)
    per_identity = torch.rand(8, 1, generator=g)[ids] + 0.01 * torch.randn(160, 1, generator=g)

    assert identity_share(labels, ids)[0] < 0.15  # labels independent of identity
    assert identity_share(per_identity, ids)[0] > 0.95  # a per-identity constant
    assert identity_share(torch.ones(160, 1), ids) == [0.0]


@pytest.mark.parametrize("mode", ["freeze", "update"])
def test_elim_loss_and_projector_running_statistics(mode):
    """With "freeze", only the main step's raw features enter the projector's running
    BatchNorm statistics (what evaluation uses); "update" is the released code."""
    x, y, ids = _batch()
    stats = {}
    for method in ("baseline", "elim"):
        model = _model(seed=3)
        cfg = _cfg(method=method, update="combined", elim_bn_stats=mode)
        opt = build_optimizers(model, cfg)
        torch.manual_seed(0)
        train_step(model, opt, x, y, ids, 3, cfg, matching_config(cfg), torch.Generator())
        bn = model.projector.net[1]
        stats[method] = (bn.running_mean.clone(), bn.running_var.clone(), bn.momentum)
    same = torch.equal(stats["baseline"][0], stats["elim"][0])
    same &= torch.equal(stats["baseline"][1], stats["elim"][1])
    assert same == (mode == "freeze")
    assert stats["elim"][2] == 0.1  # the momentum is restored afterwards


def test_train_step_matching_equals_the_library_composition():
    """train.py spells the matching step out; it must compute what
    elim.matching.elim_matching_step + elim.losses.elim_loss compute."""
    from elim.losses import elim_loss, warmup_ramp
    from elim.matching import elim_matching_step
    from elim.models import frozen_bn_stats

    x, y, ids = _batch(p=5, k=4)
    cfg = _cfg(method="elim", update="combined", num_domains=4, top_k=3, ot_backend="torch")
    model = _model(seed=4)
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    record = train_step(
        model,
        build_optimizers(model, cfg),
        x,
        y,
        ids,
        3,
        cfg,
        matching_config(cfg),
        torch.Generator().manual_seed(5),
    )
    torch.manual_seed(0)  # the same dropout draw as train_step's forward
    z, _ = reference(x)
    matched = elim_matching_step(z, y, ids, matching_config(cfg), torch.Generator().manual_seed(5))
    with frozen_bn_stats(reference.projector):
        expected = elim_loss(
            reference.projector,
            matched.features,
            matched.labels,
            matched.mask,
            ramp=warmup_ramp(3, cfg.ramp_start, cfg.ramp_end),
            weight=cfg.elim_weight,
        )
    assert record["loss_elim"] == pytest.approx(expected.item(), rel=1e-6)
    assert record["n_domains"] == matched.mask.shape[0] == 4
