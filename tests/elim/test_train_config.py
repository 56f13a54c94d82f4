"""elim.config: defaults < config file < command line, validation, round trips."""

from __future__ import annotations

import dataclasses
import doctest
import json

import elim.config
import pytest
from elim.config import TrainConfig, build_parser, load_config_file, parse_args


def test_defaults_are_the_documented_default_run():
    cfg, given = parse_args([])
    assert given == set()
    assert (cfg.method, cfg.backbone, cfg.data, cfg.update) == (
        "elim",
        "cnn",
        "synthetic",
        "two-step",
    )
    # Paper-sized matching sets: 10 identities x 12 images, so Gumbel top-10 selects;
    # the fast path of the solver unless the user chooses; a fixed thread count.
    assert (cfg.batch_size, cfg.samples_per_identity, cfg.num_domains, cfg.top_k) == (
        120,
        None,
        10,
        10,
    )
    assert elim.config.DEFAULT_SAMPLES_PER_IDENTITY == 12 > cfg.top_k
    assert cfg.ot_backend == "auto" and cfg.threads == 1 and cfg.confounding == "partial"
    # The paper's matching: eps 0.2 (lambda 5), Algorithm 1 with T = 5, detached shift.
    assert (cfg.ot_eps, cfg.sinkhorn, cfg.ot_grad, cfg.shift) == (0.2, "paper", "none", "vector")
    assert cfg.feature_dim == 64 and cfg.betas == (0.5, 0.99)


def test_required_flags_exist():
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    for flag in (
        "--method",
        "--backbone",
        "--data",
        "--data-root",
        "--image-size",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--seed",
        "--device",
        "--out",
        "--resume",
        "--pretrained",
        "--shift",
        "--sinkhorn",
        "--ot-grad",
        "--update",
        "--config",
    ):
        assert flag in flags, flag
    # Config-file-only field: not a flag.
    assert "--synthetic-overrides" not in flags


def test_command_line_overrides_config_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "baseline"\nlr = 0.01\nmax-steps = 7\nbetas = [0.9, 0.999]\n')
    cfg, given = parse_args(["--config", str(path), "--lr", "0.5", "--seed", "3"])
    assert cfg.method == "baseline"  # from the file
    assert cfg.lr == 0.5  # the flag wins over the file
    assert cfg.max_steps == 7 and cfg.betas == (0.9, 0.999)
    assert cfg.seed == 3 and cfg.backbone == "cnn"  # flag, default
    assert given == {"method", "lr", "max_steps", "betas", "seed"}


def test_json_config_with_synthetic_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"synthetic_overrides": {"n_train_identities": 3}, "epochs": 2}))
    cfg, _ = parse_args(["--config", str(path)])
    assert cfg.synthetic_overrides == {"n_train_identities": 3} and cfg.epochs == 2


def test_config_file_errors_name_the_problem(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("learning_rate = 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config_file(bad_key)
    bad_type = tmp_path / "b.json"
    bad_type.write_text('{"epochs": "ten"}')
    with pytest.raises(ValueError, match="epochs"):
        load_config_file(bad_type)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("method: elim\n")
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        load_config_file(yaml)
    with pytest.raises(ValueError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_flag_forms_bool_optional_tuple_and_resume():
    cfg, _ = parse_args(
        ["--plots", "false", "--progress", "--max-steps", "none", "--milestones", "3", "9"]
    )
    assert cfg.plots is False and cfg.progress is True
    assert cfg.max_steps is None and cfg.milestones == (3, 9)
    assert parse_args(["--resume"])[0].resume == "auto"
    assert parse_args(["--resume", "x/checkpoint.pt"])[0].resume == "x/checkpoint.pt"


def test_bad_choices_and_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--method", "elim-magic"])
    assert "--method" in capsys.readouterr().err
    with pytest.raises(ValueError, match="multiple of `samples_per_identity`"):
        parse_args(["--batch-size", "30", "--samples-per-identity", "8"])
    with pytest.raises(ValueError, match="num_domains"):
        TrainConfig(num_domains=1)
    with pytest.raises(ValueError, match="ramp_end"):
        TrainConfig(ramp_start=10, ramp_end=5)
    with pytest.raises(ValueError, match="`threads` must be >= 1, got 0"):
        TrainConfig(threads=0)
    with pytest.raises(SystemExit):
        parse_args(["--confounding", "total"])
    with pytest.raises(SystemExit):
        parse_args(["--ot-backend", "gpu"])


def test_dict_round_trip_is_json_and_lossless():
    cfg = TrainConfig(seed=5, milestones=(1, 2), synthetic_overrides={"seed": 1}, max_steps=9)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert TrainConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict({**data, "bogus": 1})


def test_every_field_documented():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_docstring_examples():
    result = doctest.testmod(elim.config)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["quick_cpu.toml", "paper_afew_va.toml", "affectnet_age.toml"])
def test_shipped_config_files_parse(name):
    from test_train_helpers import EXAMPLE_DIR

    cfg, given = parse_args(["--config", str(EXAMPLE_DIR / "configs" / name)])
    assert given, name
    if name == "quick_cpu.toml":
        # It documents the default run: every value in it must equal the default.
        defaults = TrainConfig()
        assert {k: getattr(cfg, k) for k in given} == {k: getattr(defaults, k) for k in given}
