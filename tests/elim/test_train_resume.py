"""Kill a training run, resume it, and land on exactly the state of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from elim import checkpoint
from test_train_helpers import TRAIN_PY, run_train, tiny_config, write_config

STEPS, CKPT_EVERY, KILL_AFTER = 12, 5, 7


def _assert_same(a, b, where="state"):
    """Recursive bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # ELIM with dropout, Gumbel noise, augmentation and two optimiser steps per iteration:
    # every random stream and every piece of state must survive the restart.
    cfg = write_config(
        root / "cfg.json",
        tiny_config(
            root / "data",
            backbone="alexnet",
            image_size=64,
            method="elim",
            ckpt_every=CKPT_EVERY,
            max_steps=STEPS,
            milestones=[3, 9],
        ),
    )
    reference = root / "uninterrupted"
    run_train(["--config", str(cfg), "--out", str(reference)])
    return root, cfg, reference


def test_kill_then_resume_matches_uninterrupted_run(setup):
    root, cfg, reference = setup
    out = root / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), "--config", str(cfg), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= KILL_AFTER:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own: {err.decode()[-2000:]}"
    saved = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)
    assert CKPT_EVERY <= saved["step"] < STEPS  # killed between checkpoints, before the end
    assert not (out / "metrics.json").exists()

    run_train(["--config", str(cfg), "--out", str(out), "--resume"])

    final = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)
    expected = checkpoint.load(reference / checkpoint.CHECKPOINT_NAME)
    assert final["step"] == expected["step"] == STEPS
    assert (final["epoch"], final["batch_in_epoch"]) == (
        expected["epoch"],
        expected["batch_in_epoch"],
    )
    _assert_same(final["model"], expected["model"], "model")
    _assert_same(final["optimizers"], expected["optimizers"], "optimizers")
    _assert_same(final["schedulers"], expected["schedulers"], "schedulers")
    _assert_same(final["rng"], expected["rng"], "rng")
    # The step log is continuous (no step twice) and identical to the uninterrupted one.
    resumed_log, reference_log = _log(out / "train_log.jsonl"), _log(reference / "train_log.jsonl")
    assert [r["step"] for r in resumed_log] == list(range(1, STEPS + 1))
    for a, b in zip(resumed_log, reference_log):
        assert a["loss_main"] == b["loss_main"] and a["loss_elim"] == b["loss_elim"], a["step"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )


def test_resume_continues_past_the_old_end_and_rejects_changed_settings(setup):
    root, cfg, reference = setup
    with pytest.raises(ValueError, match=r"lr=0\.5"):
        run_train(["--config", str(cfg), "--out", str(reference), "--resume", "--lr", "0.5"])
    extended = root / "extended"
    extended.mkdir()
    (extended / checkpoint.CHECKPOINT_NAME).write_bytes(
        (reference / checkpoint.CHECKPOINT_NAME).read_bytes()
    )
    # The checkpoint path alone is enough: its config is used, results go beside it.
    run_train(
        ["--resume", str(extended / checkpoint.CHECKPOINT_NAME), "--max-steps", str(STEPS + 2)]
    )
    assert checkpoint.load(extended / checkpoint.CHECKPOINT_NAME)["step"] == STEPS + 2
    assert [r["step"] for r in _log(extended / "train_log.jsonl")] == [STEPS + 1, STEPS + 2]


def test_periodic_evaluation_does_not_change_training(setup):
    """Evaluating every iteration (eval mode, no RNG draws) leaves the run bit-identical,
    so --eval-every can change on resume and between compared runs."""
    root, cfg, reference = setup
    out = root / "eval_every_step"
    run_train(["--config", str(cfg), "--out", str(out), "--eval-every", "1"])
    evals = _log(out / "eval_log.jsonl")
    assert [r["step"] for r in evals] == list(range(1, STEPS + 1))
    final = checkpoint.load(out / checkpoint.CHECKPOINT_NAME)
    expected = checkpoint.load(reference / checkpoint.CHECKPOINT_NAME)
    _assert_same(final["model"], expected["model"], "model")
    _assert_same(final["optimizers"], expected["optimizers"], "optimizers")
