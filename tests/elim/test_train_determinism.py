"""Same command, same numbers: a run's results do not depend on the machine's load."""

from __future__ import annotations

import json
import os

from test_train_helpers import run_train, tiny_config, write_config


def _run(tmp_path, name, cfg_path):
    out = tmp_path / name
    metrics = run_train(["--config", str(cfg_path), "--out", str(out)])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["loss_main"], r["loss_elim"]) for r in log]
    return metrics, losses, json.loads((out / "run.json").read_text())


def test_repeated_runs_under_different_loads_give_identical_metrics(tmp_path, monkeypatch):
    settings = tiny_config(tmp_path / "data", max_steps=3)
    del settings["threads"]  # the default thread count is the one under test
    cfg = write_config(tmp_path / "cfg.json", settings)
    quiet = _run(tmp_path, "quiet", cfg)
    # A busy machine: the thread count must not follow the load average.
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0), raising=False)
    busy = _run(tmp_path, "busy", cfg)
    assert quiet[2]["threads_per_process"] == busy[2]["threads_per_process"] == 1
    assert quiet[1] == busy[1]  # every loss of every iteration, bit for bit
    assert quiet[0] == busy[0]  # and the held-out metrics
    assert quiet[1][-1][1] > 0.0  # the ELIM loss was part of it
