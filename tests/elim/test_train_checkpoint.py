"""elim.checkpoint: atomic save, weights_only load, layout checks, RNG capture."""

from __future__ import annotations

import doctest

import elim.checkpoint
import pytest
import torch
from elim import checkpoint


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "step": 7,
        "epoch": 1,
        "batch_in_epoch": 2,
        "config": {"method": "elim", "betas": [0.5, 0.99], "max_steps": None},
        "model": model.state_dict(),
        "optimizers": {"encoder": opt.state_dict()},
        "rng": [checkpoint.capture_rng({"g": torch.Generator().manual_seed(1)})],
    }


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = checkpoint.save(tmp_path / "sub" / "ckpt.pt", state)
    assert path.is_file() and not path.with_name("ckpt.pt.tmp").exists()
    loaded = checkpoint.load(path)
    assert loaded["format"] == checkpoint.CHECKPOINT_FORMAT and loaded["step"] == 7
    assert loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizers"]["encoder"]["state"][0]["step"] == 1
    assert torch.equal(loaded["rng"][0]["g"], state["rng"][0]["g"])


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing keys"):
        checkpoint.load(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not an ELIM checkpoint"):
        checkpoint.load(tmp_path / "list.pt")
    state = _state()
    checkpoint.save(tmp_path / "old.pt", state)
    raw = torch.load(tmp_path / "old.pt", weights_only=True)
    raw["format"] = 99
    torch.save(raw, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="format 99"):
        checkpoint.load(tmp_path / "old.pt")


def test_pickled_code_is_refused(tmp_path):
    from fractions import Fraction  # any class outside the weights_only allow-list

    torch.save({**_state(), "extra": Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        checkpoint.load(tmp_path / "evil.pt")


def test_rng_capture_restores_global_and_named_streams():
    gen = torch.Generator().manual_seed(3)
    state = checkpoint.capture_rng({"matching": gen})
    a, b = torch.rand(3), torch.rand(3, generator=gen)
    checkpoint.restore_rng(state, {"matching": gen})
    assert torch.equal(a, torch.rand(3)) and torch.equal(b, torch.rand(3, generator=gen))


def test_docstring_examples():
    result = doctest.testmod(elim.checkpoint)
    assert result.attempted > 0 and result.failed == 0
