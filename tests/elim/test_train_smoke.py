"""Smoke test of train.py: 2 iterations of every backbone x method on tiny inputs (CPU).

The twelve runs take under a minute of CPU time in total: a 9-identity synthetic set of
32 px faces, feature size 8, one thread, and the MLP-Mixer at 16 px (a single token; its
59M parameters, their Adam states and the checkpoint still dominate). CPU time rather
than wall time is asserted, so that other jobs on a shared machine cannot fail the test.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from test_train_helpers import read_png_size, run_train, tiny_config, write_config

METRIC_KEYS = {"rmse_v", "rmse_a", "sagr_v", "sagr_a", "pcc_v", "pcc_a", "ccc_v", "ccc_a"}
# AlexNet needs >= 63 px; ResNet-18 runs at the tiny data's 32 px, the Mixer at 16 px.
IMAGE_SIZE = {"cnn": 32, "alexnet": 64, "resnet18": 32, "mixer": 16}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_synthetic")


@pytest.fixture(scope="module")
def timings():
    record = {}
    yield record
    cpu = sum(c for c, _ in record.values())
    assert cpu < 60, f"smoke runs took (CPU s, wall s) {record}: {cpu:.0f} s of CPU > 60 s"


@pytest.mark.parametrize("method", ["baseline", "elim", "elim-attention"])
@pytest.mark.parametrize("backbone", ["cnn", "alexnet", "resnet18", "mixer"])
def test_two_training_steps(backbone, method, tiny_root, tmp_path, timings):
    cfg = write_config(
        tmp_path / "cfg.json",
        tiny_config(tiny_root, image_size=IMAGE_SIZE[backbone], plots=backbone == "resnet18"),
    )
    out = tmp_path / "run"
    cpu, wall = time.process_time(), time.perf_counter()
    metrics = run_train(
        ["--config", str(cfg), "--backbone", backbone, "--method", method, "--out", str(out)]
    )
    timings[f"{backbone}-{method}"] = (time.process_time() - cpu, time.perf_counter() - wall)

    written = json.loads((out / "metrics.json").read_text())
    assert set(written) == METRIC_KEYS and written == pytest.approx(metrics)
    assert all(math.isfinite(v) for v in written.values())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss_main"]) for r in log)
    # ramp_start=0, ramp_end=1: the ELIM loss is off at iteration 0 and on at iteration 1.
    if method != "baseline":
        assert log[0]["loss_elim"] == 0.0 and log[1]["loss_elim"] > 0.0
        assert log[1]["n_domains"] >= 2
        # The log says how much of the training step the matching step took.
        assert 0.0 < log[1]["matching_seconds"] < log[1]["step_seconds"]
        assert log[1]["matching_share"] == pytest.approx(
            log[1]["matching_seconds"] / log[1]["step_seconds"]
        )
    else:
        assert all(r["loss_elim"] == 0.0 for r in log)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["backbone"] == backbone
    has_attention = any(k.startswith("attention.") for k in state["model"])
    assert has_attention == (method == "elim-attention")
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 2 and run["replicas_in_sync"] is True
    if backbone == "resnet18":  # plots: one backbone is enough to exercise them
        for name in ("va_scatter.png", "training_curves.png"):
            width, height = read_png_size(out / name)
            assert width > 300 and height > 200
