"""ELIM-Age (appendix §4.4): age-group domains through the CLI, strict ages, the default domain."""

from __future__ import annotations

import json

import pytest
import torch
from elim.config import TrainConfig
from elim.data.pipeline import build_training_data, check_age_domain, make_sampler
from PIL import Image
from test_data_affectnet import HEADER, _row
from test_train_helpers import TINY_SYNTHETIC, run_train, tiny_config, write_config

# The paper's groups [18,30), [30,40), [40,50), [50,60), [60,85), written out by hand.
AGE_TO_GROUP = [(18, 0), (29, 0), (30, 1), (39, 1), (40, 2), (49, 2), (50, 3), (59, 3)]
AGE_TO_GROUP += [(60, 4), (84, 4)]


def _csv_root(tmp_path, ages):
    """A CSV dataset with one identity per age, one image each, in both splits."""
    for split, name in (("train", "training.csv"), ("val", "validation.csv")):
        folder = tmp_path / split
        rows = ["subDirectory_filePath,valence,arousal"]
        for n, _ in enumerate(ages):
            (folder / f"p{n}").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / f"p{n}" / "0.png")
            rows.append(f"p{n}/0.png,0.1,-0.1")
        (folder / name).write_text("\n".join(rows) + "\n")
        ages_text = "".join(f"p{n},{a}\n" for n, a in enumerate(ages))
        (folder / "ages.csv").write_text("identity,age\n" + ages_text)
    return tmp_path


def test_age_groups_follow_the_bin_edges(tmp_path):
    ages = [a for a, _ in AGE_TO_GROUP]
    root = _csv_root(tmp_path, ages)
    cfg = TrainConfig(data="csv", data_root=str(root), domain="age", image_size=8)
    train, evaluation = build_training_data(cfg, root)
    assert train.domain_kind == "age_group"
    assert train.ages.tolist() == ages
    assert train.identities.tolist() == [g for _, g in AGE_TO_GROUP]
    assert evaluation.identities.tolist() == [g for _, g in AGE_TO_GROUP]


@pytest.mark.parametrize("bad_age", [17, 85, 90])
def test_ages_outside_the_groups_are_an_error_with_domain_age(tmp_path, bad_age):
    root = _csv_root(tmp_path, [25, bad_age, 40])
    cfg = TrainConfig(data="csv", data_root=str(root), domain="age", image_size=8)
    with pytest.raises(ValueError, match=rf"ages in \[18, 85\).*got age {bad_age}"):
        build_training_data(cfg, root)
    # With identity domains the same ages are just metadata: no error.
    train, _ = build_training_data(TrainConfig(data="csv", domain="identity", image_size=8), root)
    assert train.domain_kind == "identity" and bad_age in train.ages.tolist()


def test_missing_ages_are_an_error_with_domain_age(tmp_path):
    root = _csv_root(tmp_path, [25, 33])
    (root / "train" / "ages.csv").write_text("identity,age\np0,25\n")  # p1 has none
    with pytest.raises(ValueError, match=r"no age for 1 identity value\(s\).*'p1'"):
        build_training_data(TrainConfig(data="csv", domain="age", image_size=8), root)

    class NoAges:
        ages = None

    with pytest.raises(ValueError, match="--domain age needs an age for every image"):
        check_age_domain(NoAges(), "train")


def test_identity_is_the_effective_default_domain_for_synthetic(tmp_path):
    assert TrainConfig().domain == "auto"
    cfg = TrainConfig(synthetic_overrides=TINY_SYNTHETIC, image_size=32)
    train, evaluation = build_training_data(cfg, tmp_path)
    assert train.domain_kind == evaluation.domain_kind == "identity"
    assert len(train.identity_names) == TINY_SYNTHETIC["n_train_identities"]
    age, _ = build_training_data(TrainConfig(**{**cfg.to_dict(), "domain": "age"}), tmp_path)
    assert age.domain_kind == "age_group"
    assert torch.equal(age.labels, train.labels)  # the same images, other domains


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_cli_elim_age_on_synthetic(tmp_path):
    # K = 4 of a batch of 8: P = 2 age groups per batch (the tiny set has at least 2).
    cfg = write_config(tmp_path / "cfg.json", tiny_config(tmp_path / "data", backbone="resnet18"))
    out = tmp_path / "run"
    args = ["--config", str(cfg), "--method", "elim", "--domain", "age"]
    run_train([*args, "--samples-per-identity", "4", "--out", str(out)])
    log = _log(out)
    assert log[1]["loss_elim"] > 0 and log[1]["n_domains"] == 2
    assert json.loads((out / "run.json").read_text())["config"]["domain"] == "age"


@pytest.fixture
def affectnet_root(tmp_path):
    images = tmp_path / "Manually_Annotated_Images"
    train = [
        (f"1/{n}.jpg", 0.1 * n - 0.4, 0.3 - 0.1 * n, age)
        for n, age in enumerate([20, 25, 33, 36, 44, 47, 55, 58])
    ]
    val = [("2/a.jpg", 0.2, 0.1, 70), ("2/b.jpg", -0.3, 0.4, 22), ("2/c.jpg", 0.5, -0.2, 41)]
    for rel, *_ in train + val:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (20 * len(rel), 90, 30)).save(images / rel)
    (tmp_path / "training.csv").write_text(HEADER + "".join(_row(r, v, a) for r, v, a, _ in train))
    (tmp_path / "validation.csv").write_text(HEADER + "".join(_row(r, v, a) for r, v, a, _ in val))
    ages = "".join(f"{rel},{age}\n" for rel, _, _, age in train + val)
    (tmp_path / "ages.csv").write_text("subDirectory_filePath,age\n" + ages)
    return tmp_path


def test_cli_elim_age_on_affectnet_with_an_age_file(affectnet_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data", "affectnet", "--data-root", str(affectnet_root), "--domain", "age"]
    args += ["--age-file", str(affectnet_root / "ages.csv"), "--method", "elim"]
    args += ["--backbone", "resnet18", "--image-size", "32", "--feature-dim", "8"]
    args += ["--batch-size", "4", "--samples-per-identity", "2", "--num-domains", "2"]
    args += ["--max-steps", "2", "--ramp-start", "0", "--ramp-end", "1", "--threads", "1"]
    args += ["--progress", "false", "--plots", "false", "--out", str(out)]
    metrics = run_train(args)
    assert len(metrics) == 8
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[1]["loss_elim"] > 0 and log[1]["n_domains"] == 2


def test_cli_affectnet_age_rejects_out_of_range_ages(affectnet_root, tmp_path):
    ages = affectnet_root / "ages.csv"
    ages.write_text(ages.read_text().replace("2/b.jpg,22", "2/b.jpg,12"))
    args = ["--data", "affectnet", "--data-root", str(affectnet_root), "--domain", "age"]
    args += ["--age-file", str(ages), "--out", str(tmp_path / "run"), "--max-steps", "1"]
    with pytest.raises(ValueError, match=r"eval split, .*validation\.csv.*got age 12"):
        run_train(args)


def test_too_few_age_groups_for_the_batch_shape_names_the_flags():
    from types import SimpleNamespace

    # 5 age groups, but batches of 32 / 4 = 8 domains: the error says which K fits.
    groups = torch.arange(40) % 5
    dataset = SimpleNamespace(identities=groups.numpy(), domain_kind="age_group")
    cfg = TrainConfig(method="elim", domain="age", batch_size=32, samples_per_identity=4)
    with pytest.raises(
        ValueError,
        match=r"has 5 domains.*8 domains per step.*use "
        r"--samples-per-identity 8 \(4 domains x 8 images\)",
    ):
        make_sampler(dataset, cfg, rank=0, world_size=1)
    fitting = TrainConfig(method="elim", domain="age", batch_size=32, samples_per_identity=8)
    sampler, layout = make_sampler(dataset, fitting, rank=0, world_size=1)
    assert sampler.identities_per_batch == 4 and layout.note is None
    # Without --samples-per-identity the layout is chosen to fit, and said so.
    chosen = TrainConfig(method="elim", domain="age", batch_size=30)
    sampler, layout = make_sampler(dataset, chosen, rank=0, world_size=1)
    assert (sampler.identities_per_batch, sampler.samples_per_identity) == (5, 6)
    assert "5 x 6 (--samples-per-identity 6)" in layout.note


def test_cli_domain_age_picks_the_batch_layout_and_says_so(tmp_path, capsys):
    # Batches of 8 / default K 12 do not fit; the tiny set's age groups get 8 / P each.
    cfg = write_config(tmp_path / "cfg.json", tiny_config(tmp_path / "data"))
    text = json.loads(cfg.read_text())
    del text["samples_per_identity"]
    cfg.write_text(json.dumps(text))
    out = tmp_path / "run"
    run_train(["--config", str(cfg), "--method", "elim", "--domain", "age", "--out", str(out)])
    note = [
        line for line in capsys.readouterr().out.splitlines() if "cannot fill the default" in line
    ]
    assert len(note) == 1 and "--samples-per-identity" in note[0]
    layout = json.loads((out / "run.json").read_text())["batch_layout"]
    assert layout[0] * layout[1] == 8 and layout[0] >= 2
