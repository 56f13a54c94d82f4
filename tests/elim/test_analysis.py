"""elim.analysis (probes, pairs, t-SNE) and examples/elim/figures.py on a tiny trained run."""

from __future__ import annotations

import doctest
import importlib.util
import json
import sys

import elim.analysis
import numpy as np
import pytest
from elim.analysis import identity_probe, shift_pairs, tsne_embedding, va_probe
from test_train_helpers import EXAMPLE_DIR, read_png_size, run_train, tiny_config, write_config

FIGURES_PY = EXAMPLE_DIR / "figures.py"


def _ids(n_identities=8, per=12):
    return np.repeat(np.arange(n_identities), per)


def test_identity_probe_is_perfect_on_one_hot_identity_features():
    ids = _ids()
    result = identity_probe(np.eye(8)[ids], ids)
    assert result["accuracy"] == 1.0
    assert result["chance"] == pytest.approx(1 / 8) and result["n_identities"] == 8


def test_identity_probe_is_near_chance_on_features_without_identity():
    ids = _ids()
    noise = np.random.default_rng(0).normal(size=(len(ids), 16))
    result = identity_probe(noise, ids)
    assert result["accuracy"] < 0.3  # chance 0.125; perfect would be 1


def test_identity_probe_chance_is_the_majority_share():
    ids = np.array([0] * 6 + [1] * 3 + [2] * 3)
    assert identity_probe(np.eye(3)[ids], ids)["chance"] == pytest.approx(0.5)


def test_va_probe_recovers_linear_labels_and_not_noise():
    rng = np.random.default_rng(1)
    ids = _ids()
    labels = rng.uniform(-1, 1, (len(ids), 2))
    mixing = rng.normal(size=(2, 10))
    good = va_probe(labels @ mixing + 0.01 * rng.normal(size=(len(ids), 10)), labels, ids)
    assert good["r2_v"] > 0.95 and good["r2_a"] > 0.95
    bad = va_probe(rng.normal(size=(len(ids), 10)), labels, ids)
    assert bad["r2_v"] < 0.1 and bad["r2_a"] < 0.1


def test_va_probe_does_not_score_by_remembering_people():
    """Labels constant per identity, features = identity one-hot: with identity-disjoint
    folds the probe cannot use who it is, so R² must not be high."""
    rng = np.random.default_rng(2)
    ids = _ids()
    labels = rng.uniform(-1, 1, (8, 2))[ids]
    result = va_probe(np.eye(8)[ids], labels, ids)
    assert result["r2_v"] < 0.2 and result["r2_a"] < 0.2


def test_probe_argument_errors_name_the_argument():
    ids = _ids(2, 3)
    with pytest.raises(ValueError, match=r"`features` must be 2-D with 6 rows, got shape \(5, 2\)"):
        identity_probe(np.zeros((5, 2)), ids)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        identity_probe(np.zeros((6, 2)), np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match=r"`labels` must be 2-D with 6 rows"):
        va_probe(np.zeros((6, 2)), np.zeros(6), ids)


def test_shift_pairs_are_the_closest_labels_of_different_people():
    labels = np.array([[0.0, 0.0], [0.02, 0.0], [0.5, 0.5], [0.9, 0.9], [0.52, 0.5], [0.0, 0.01]])
    ids = np.array([0, 0, 1, 2, 3, 4])
    pairs = shift_pairs(labels, ids, n_pairs=5)
    # (0, 5) is closest (0.01) across people; (0, 1) is closer-looking but one person.
    assert pairs[0] == (0, 5)
    assert pairs[1] == (2, 4)
    assert len(pairs) == 2  # identity 0, 1, 3, 4 used once each; 2 has no partner left
    for i, j in pairs:
        assert ids[i] != ids[j]


def test_tsne_embedding_keeps_separated_clusters_apart():
    rng = np.random.default_rng(3)
    feats = np.r_[rng.normal(0, 0.1, (15, 5)), rng.normal(5, 0.1, (15, 5))]
    emb = tsne_embedding(feats)
    assert emb.shape == (30, 2)
    within = np.linalg.norm(emb[:15] - emb[:15].mean(0), axis=1).mean()
    between = np.linalg.norm(emb[:15].mean(0) - emb[15:].mean(0))
    assert between > 3 * within


def test_docstring_examples():
    result = doctest.testmod(elim.analysis)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("elim_figures_script", FIGURES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("elim_figures_script", module)
    spec.loader.exec_module(module)
    return module


def test_figures_command_on_tiny_runs(figures, tmp_path):
    data = {
        "n_train_identities": 6,
        "n_test_identities": 4,
        "train_images_per_identity": 6,
        "test_images_per_identity": 6,
        "image_size": 32,
        "render_scale": 1,
    }
    cfg = write_config(
        tmp_path / "cfg.json",
        tiny_config(tmp_path / "data", backbone="resnet18", synthetic_overrides=data),
    )
    runs = tmp_path / "runs"
    for method in ("baseline", "elim"):
        run_train(
            ["--config", str(cfg), "--method", method, "--out", str(runs / f"{method}-seed0")]
        )
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept\n")
    out = tmp_path / "figs"
    args = ["--runs", str(runs), "--out", str(out), "--seeds", "0", "--results", str(results)]
    result = figures.main([*args, "--tsne-identities", "3", "--pairs", "2"])
    assert set(result["probes"]) == {"baseline", "elim"}
    for probe in result["probes"].values():
        assert 0.0 <= probe[0]["accuracy"] <= 1.0 and probe[0]["chance"] == pytest.approx(0.25)
    assert json.loads((runs / "probes.json").read_text())["elim"]["0"]["chance"] == 0.25
    names = sorted(p.name for p in result["figures"])
    assert names == ["identity_shift.png", "training_curves.png", "tsne.png"]
    for path in result["figures"]:
        width, height = read_png_size(path)
        assert width > 300 and height > 200
        assert path.stat().st_size < 400_000  # commit-sized
    text = results.read_text()
    assert text.startswith("# Results\n\nkept") and "<!-- probes:begin -->" in text
    assert "| ELIM-Sinkhorn | 1 |" in text and "identity accuracy (chance 0.250)" in text


def test_figures_docstring_examples(figures):
    result = doctest.testmod(figures)
    assert result.attempted > 0 and result.failed == 0


def test_figures_command_without_runs_says_what_it_looked_for(figures, tmp_path):
    with pytest.raises(SystemExit, match=r"no <method>-seed<S>/checkpoint\.pt"):
        figures.main(["--runs", str(tmp_path), "--probes-only"])


def test_elim_loss_reach_is_zero_with_per_identity_batchnorm_only():
    """BatchNorm over one identity's batch is invariant to shifting all of its features
    by one vector, so the summed gradient over the identity is exactly 0 (the oracle);
    one BatchNorm batch across identities lets the loss move an identity's mean."""
    import torch
    from elim.analysis import elim_loss_reach
    from elim.models import Projector

    torch.manual_seed(0)
    z = torch.randn(4, 8, 6)
    # Every identity's labels sit far from the others': the loss wants its mean moved.
    y = torch.tensor([[-0.8, -0.8], [0.8, 0.8], [-0.8, 0.8], [0.8, -0.8]])[:, None, :].expand(
        4, 8, 2
    )
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[3, 5:] = False  # a ragged identity
    projector = Projector(6).train()
    assert max(elim_loss_reach(projector, z, y, mask, per_domain=True)) < 1e-5
    assert min(elim_loss_reach(projector, z, y, mask, per_domain=False)) > 0.3
