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
    assert "| metric | baseline | elim | elim scalar |" in text
    assert "ELIM − baseline, mean CCC:" in text
    assert "--config" in text  # the exact command is recorded
    assert (tmp_path / "runs" / "elim-scalar-seed0" / "metrics.json").is_file()
