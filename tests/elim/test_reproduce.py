"""examples/elim/reproduce.py: statistics, tables, the results file, and a tiny full run."""

from __future__ import annotations

import doctest
import importlib.util
import sys

import pytest
from test_train_helpers import REPRODUCE_PY, run_train, tiny_config, write_config


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("elim_reproduce_script", REPRODUCE_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("elim_reproduce_script", module)
    spec.loader.exec_module(module)
    return module


def _metrics(value):
    return {f"{k}_{a}": value for k in ("rmse", "sagr", "pcc", "ccc") for a in "va"}


def test_mean_std_and_table(reproduce):
    assert reproduce.mean_std([2.0]) == (2.0, 0.0)
    assert reproduce.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    table = reproduce.results_table(
        {"baseline": [_metrics(0.1), _metrics(0.3)], "elim": [_metrics(0.5), _metrics(0.5)]}
    )
    lines = table.splitlines()
    assert lines[0] == "| metric | baseline | elim |"
    assert "| CCC valence | 0.200 ± 0.141 | 0.500 ± 0.000 |" in lines
    assert lines[-1] == "| **mean CCC** | **0.200 ± 0.141** | **0.500 ± 0.000** |"
    assert len(lines) == 2 + 8 + 1


def test_write_block_keeps_text_outside_the_markers(reproduce, tmp_path):
    path = tmp_path / "RESULTS.md"
    reproduce.write_block(path, "first table")
    text = path.read_text()
    assert reproduce.BEGIN in text and "first table" in text
    path.write_text("# Title\n\nintro\n\n" + text.split("\n\n", 1)[1] + "\n## Findings\nkept\n")
    reproduce.write_block(path, "second table")
    text = path.read_text()
    assert "first table" not in text and "second table" in text
    assert text.startswith("# Title\n\nintro") and text.endswith("## Findings\nkept\n")


def test_docstring_examples(reproduce):
    result = doctest.testmod(reproduce)
    assert result.attempted > 0 and result.failed == 0


def test_end_to_end_on_tiny_data(reproduce, tmp_path, monkeypatch):
    """Every run goes through train.py's command line; here in-process (no interpreter
    start-up per run), by intercepting the subprocess call."""
    commands = []

    def fake_run(cmd, check, stdout=None):
        assert cmd[1].endswith("train.py") and check
        commands.append(cmd)
        run_train(cmd[2:])

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    cfg = write_config(
        tmp_path / "cfg.json", tiny_config(tmp_path / "data", backbone="resnet18", max_steps=1)
    )
    results = tmp_path / "RESULTS.md"
    runs = reproduce.main(
        [
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "runs"),
            "--results",
            str(results),
            "--train-args",
            "--plots false",
            "--methods",
            "baseline",
            "elim",
            "--variant",
            "elim scalar",
            "--method elim --shift scalar",
            "--",
            "--config",
            str(cfg),
        ]
    )
    assert set(runs) == {"baseline", "elim", "elim scalar"}
    assert all(len(v) == 1 for v in runs.values())
    assert [c[c.index("--method") + 1] for c in commands] == ["baseline", "elim", "elim"]
    assert commands[2][-2:] == ["--config", str(cfg)] and "--shift" in commands[2]
    text = results.read_text()
    assert "| metric | baseline | ELIM | elim scalar |" in text
    assert "ELIM − baseline, mean CCC: **" in text and "(one seed; paired over seeds 0" in text
    assert "--config" in text  # the exact command is recorded
    assert (tmp_path / "runs" / "elim-scalar-seed0" / "metrics.json").is_file()


def test_method_rows_table_has_one_row_per_method(reproduce):
    runs = {"baseline": [_metrics(0.1), _metrics(0.3)], "elim-age": [_metrics(0.4)]}
    lines = reproduce.method_rows_table(runs, {"elim-age": "ELIM-Age"}).splitlines()
    assert lines[0] == "| method | RMSE (V) | CCC (V) | RMSE (A) | CCC (A) | mean CCC |"
    assert lines[2] == "| baseline | " + " | ".join(["0.200 ± 0.141"] * 5) + " |"
    assert lines[3].startswith("| ELIM-Age | 0.400 ± 0.000 |")
    assert len(lines) == 4


def test_presets_give_the_table_columns_their_train_arguments(reproduce, tmp_path, capsys):
    methods = ["baseline", "elim", "elim-attention", "elim-age", "baseline-age"]
    reproduce.main(["--dry-run", "--seeds", "0", "--out", str(tmp_path), "--methods", *methods])
    commands = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$")]
    assert len(commands) == 5
    assert "--method elim-attention --seed 0" in commands[2]
    # ELIM-Age leaves the batch layout to train.py (5 age groups x batch / 5).
    assert "--method elim --domain age --seed 0" in commands[3]
    assert "--method baseline --domain age --seed 0" in commands[4]
    assert str(tmp_path / "elim-age-seed0") in commands[3]


def test_attention_column_and_reuse_of_finished_runs(reproduce, tmp_path, monkeypatch):
    commands = []

    def fake_run(cmd, check, stdout=None):
        commands.append(cmd)
        run_train(cmd[2:])

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    cfg = write_config(
        tmp_path / "cfg.json", tiny_config(tmp_path / "data", backbone="resnet18", max_steps=1)
    )
    results = tmp_path / "RESULTS.md"
    args = ["--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(results)]
    args += ["--methods", "baseline", "elim-attention", "--train-args", "--plots false"]
    first = reproduce.main([*args, "--", "--config", str(cfg)])
    assert len(commands) == 2 and set(first) == {"baseline", "elim-attention"}
    text = results.read_text()
    assert "| method | RMSE (V) | CCC (V) | RMSE (A) | CCC (A) | mean CCC |" in text
    assert "| ELIM-Attention | " in text and "ELIM-Attention − baseline, mean CCC:" in text
    # Same settings: nothing is rerun and the metrics are the same.
    again = reproduce.main([*args, "--reuse", "--", "--config", str(cfg)])
    assert len(commands) == 2 and again == first
    assert "2 finished runs with the same settings reused" in results.read_text()
    # A changed setting is a different experiment: it runs again.
    reproduce.main([*args, "--reuse", "--", "--config", str(cfg), "--lr", "0.003"])
    assert len(commands) == 4


def test_paired_difference_interval_matches_scipy(reproduce):
    stats = pytest.importorskip("scipy.stats")
    treated, control = [0.61, 0.55, 0.70, 0.64, 0.58], [0.50, 0.57, 0.61, 0.52, 0.55]
    diffs = [t - c for t, c in zip(treated, control)]
    mean, low, high = reproduce.paired_difference(treated, control)
    expected = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5, scale=stats.sem(diffs))
    assert mean == pytest.approx(sum(diffs) / 5)
    assert (low, high) == pytest.approx(expected, abs=2e-3)  # t table to 3 decimals
    for df in (1, 2, 3, 4, 9, 30):
        assert reproduce.t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_columns_levels_and_controls(reproduce, tmp_path, capsys):
    assert reproduce.column_args("elim@strong") == ["--method", "elim", "--confounding", "strong"]
    assert reproduce.column_args("elim-shared-bn") == [
        "--method",
        "elim",
        "--per-domain-projector",
        "false",
    ]
    assert reproduce.control_of("elim-attention@none") == "baseline@none"
    assert reproduce.control_of("elim-age") == "baseline-age"
    assert reproduce.display_name("elim@partial") == "ELIM (partial)"
    # The default columns: baseline and ELIM at every level, and every method's control.
    columns = set(reproduce.DEFAULT_COLUMNS)
    for level in ("none", "partial", "strong"):
        assert {f"baseline@{level}", f"elim@{level}"} <= columns
    assert all(reproduce.control_of(c) in columns for c in columns)
    assert len(reproduce.DEFAULT_SEEDS) >= 5
    reproduce.main(["--dry-run", "--out", str(tmp_path)])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$")]
    assert len(commands) == len(columns) * len(reproduce.DEFAULT_SEEDS)


def test_table_only_reports_finished_runs_and_names_the_missing(reproduce, tmp_path, monkeypatch):
    monkeypatch.setattr(
        reproduce.subprocess, "run", lambda cmd, check, stdout=None: run_train(cmd[2:])
    )
    cfg = write_config(tmp_path / "cfg.json", tiny_config(tmp_path / "data", max_steps=1))
    results = tmp_path / "RESULTS.md"
    args = ["--out", str(tmp_path / "runs"), "--results", str(results), "--train-args", ""]
    reproduce.main(
        [*args, "--seeds", "0", "--methods", "baseline", "elim", "--", "--config", str(cfg)]
    )
    monkeypatch.setattr(reproduce.subprocess, "run", None)  # --table-only never runs anything
    only = [*args, "--table-only", "--seeds", "0", "1", "--methods", "baseline", "elim"]
    runs = reproduce.main([*only, "--", "--config", str(cfg)])
    assert {k: len(v) for k, v in runs.items()} == {"baseline": 1, "elim": 1}
    text = results.read_text()
    assert "Not finished (left out): baseline seed 1; elim seed 1." in text
    assert "paired over seeds 0, ahead in" in text
    assert "| 1 | - | - | - | - |" in text
    assert "| iteration | baseline | ELIM |" in text  # the curves of the finished runs
