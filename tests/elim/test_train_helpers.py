"""Shared set-up of the train.py tests (a tiny synthetic dataset, an in-process runner),
and the tests of that set-up itself."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import torch

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "elim"
TRAIN_PY = EXAMPLE_DIR / "train.py"
REPRODUCE_PY = EXAMPLE_DIR / "reproduce.py"

# Test-only override of the (frozen) generator: 6 + 3 identities of a few 32 px faces,
# rendered without supersampling; generation takes about a second.
TINY_SYNTHETIC = {
    "n_train_identities": 6,
    "n_test_identities": 3,
    "train_images_per_identity": 6,
    "test_images_per_identity": 4,
    "image_size": 32,
    "render_scale": 1,
}


def tiny_config(data_root: Path, **overrides) -> dict:
    """A config-file dict for a seconds-long run on the tiny dataset."""
    cfg = {
        "synthetic_overrides": TINY_SYNTHETIC,
        "data_root": str(data_root),
        "image_size": 32,
        "feature_dim": 8,
        "batch_size": 8,
        "samples_per_identity": 2,
        "num_domains": 4,
        "top_k": 2,
        "max_steps": 2,
        "ramp_start": 0,
        "ramp_end": 1,
        "threads": 1,
        "progress": False,
        "plots": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def load_train_module():
    """Import examples/elim/train.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("elim_train_script", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("elim_train_script", module)
    spec.loader.exec_module(module)
    return module


def run_train(argv: list[str]) -> dict:
    """Run ``train.main(argv)`` in this process, restoring torch's thread count."""
    threads = torch.get_num_threads()
    try:
        return load_train_module().main(argv)
    finally:
        torch.set_num_threads(threads)


def read_png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a PNG header; raises if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def test_tiny_config_is_a_valid_train_config(tmp_path):
    from elim.config import parse_args
    from elim.data.synthetic import SyntheticConfig

    cfg, given = parse_args(
        ["--config", str(write_config(tmp_path / "c.json", tiny_config(tmp_path)))]
    )
    assert cfg.max_steps == 2 and "synthetic_overrides" in given
    assert SyntheticConfig(**cfg.synthetic_overrides).n_train_identities == 6


def test_read_png_size(tmp_path):
    from PIL import Image

    Image.new("RGB", (7, 5)).save(tmp_path / "a.png")
    assert read_png_size(tmp_path / "a.png") == (7, 5)
    (tmp_path / "b.png").write_bytes(b"not a png at all........")
    try:
        read_png_size(tmp_path / "b.png")
    except ValueError as error:
        assert "not a PNG" in str(error)
    else:
        raise AssertionError("a non-PNG file must be rejected")
