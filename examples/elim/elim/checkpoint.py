"""Checkpoints: everything needed to continue a run exactly, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
:func:`torch.load` can read it with ``weights_only=True`` (no pickled code runs)::

    {
      "format": 1,
      "step": int,                # iterations done
      "epoch": int, "batch_in_epoch": int,   # where the sampler stands
      "config": dict,             # TrainConfig.to_dict()
      "model": state_dict,        # encoder + projector (+ attention)
      "optimizers": {name: state_dict},
      "schedulers": {name: state_dict},
      "rng": [per-rank dict of generator states],
      "history": {...},           # small run records (evaluations so far)
    }

Saving writes to a temporary file and renames it, so a run killed mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import RESUMABLE_OVERRIDES, TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "append_jsonl",
    "capture_rng",
    "load",
    "read_jsonl",
    "resolve_resume",
    "restore_rng",
    "save",
    "truncate_jsonl",
]

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
_REQUIRED = ("format", "step", "epoch", "batch_in_epoch", "config", "model", "optimizers")


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + rename).

    Args:
        path: destination file.
        state: the checkpoint dict (see the module docstring).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU and check its layout.

    Args:
        path: a file written by :func:`save`.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an ELIM checkpoint (got {type(state).__name__})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path}: not an ELIM checkpoint, missing keys {missing}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {state['format']} is not supported "
            f"(expected {CHECKPOINT_FORMAT})"
        )
    return state


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor | list]:
    """Snapshot the global torch RNG (dropout), CUDA RNGs and the named generators.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> state = capture_rng({"matching": g})
        >>> a = torch.rand(2, generator=g)
        >>> restore_rng(state, {"matching": g})
        >>> torch.equal(a, torch.rand(2, generator=g))
        True
    """
    state: dict[str, torch.Tensor | list] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in generators.items():
        state[name] = gen.get_state()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_rng` (missing entries are left as they are)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        if name in state:
            gen.set_state(state[name])


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (``[]`` if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Drop records with ``step > max_step``: a resumed run rewrites what came after
    its checkpoint, so the log never holds two versions of a step."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record to a JSON-lines log."""
    with Path(path).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def resolve_resume(
    cfg: TrainConfig, given: set[str], default_out: Path
) -> tuple[TrainConfig, dict | None]:
    """The config of this run and, with ``--resume``, the checkpoint to continue from.

    Without ``--resume``: ``cfg`` (``out`` defaulting to ``default_out``) and ``None``.
    With it: the checkpoint's config, plus the run-control flags given now
    (:data:`elim.config.RESUMABLE_OVERRIDES`); any other flag that differs from the
    saved run is an error, because changing it mid-run would silently make a
    different experiment.

    Args:
        cfg: the parsed config.
        given: the fields set on the command line or in a config file.
        default_out: output folder when ``cfg.out`` is None.

    Returns:
        ``(config, checkpoint state or None)``.
    """
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(default_out))
    if cfg.resume is None:
        return cfg, None
    path = Path(cfg.out) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)
    state = load(path)
    saved = TrainConfig.from_dict(state["config"])
    changed = sorted(k for k in given - RESUMABLE_OVERRIDES if getattr(cfg, k) != getattr(saved, k))
    if changed:
        raise ValueError(
            f"--resume continues the run saved in {path}; these settings differ from it: "
            + ", ".join(f"{k}={getattr(cfg, k)!r} (saved {getattr(saved, k)!r})" for k in changed)
        )
    overrides = {k: getattr(cfg, k) for k in given & RESUMABLE_OVERRIDES}
    overrides.setdefault("out", str(path.parent))  # results go beside the checkpoint
    overrides["resume"] = str(path)
    return dataclasses.replace(saved, **overrides), state
