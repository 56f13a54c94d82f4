"""Convert raw AFEW-VA to the CSV layout of the released code.

Raw AFEW-VA, as distributed (all parts unzipped into one folder)::

    raw/001/00000.png, 00001.png, ...
    raw/001/001.json   {"actor": "...", "frames": {"00000": {"valence": v, "arousal": a,
                         "landmarks": [...]}, ...}, ...}      labels on the [-10, 10] scale

Output (labels divided by 10; images linked or copied, never re-encoded)::

    out/train/training.csv   subDirectory_filePath,valence,arousal
    out/val/validation.csv
    out/{train|val}/<clip>/<frame>.png            with identity="clip"
    out/{train|val}/<actor>/<clip>/<frame>.png    with identity="actor"

The first path component is the identity, as the released code expects. The split is by
identity (no identity in both splits), seeded. Run as a script::

    python -m elim.data.afew_va RAW OUT [--identity actor] [--val-fraction 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._cache import has_record, locked, write_record
from ._csvio import parse_float, write_va_csv
from .csv_dataset import SPLIT_FILES

IDENTITY_MODES = ("clip", "actor")
LINK_MODES = ("symlink", "copy")
AFEW_VA_SCALE = 10.0
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Clip:
    """One parsed AFEW-VA clip: ``frames`` holds ``(file name, valence, arousal)`` in [-1, 1]."""

    name: str
    folder: Path
    actor: str | None
    frames: tuple[tuple[str, float, float], ...]


def _frame_file(folder: Path, key: str, json_path: Path) -> str:
    for suffix in _IMAGE_SUFFIXES:
        if (folder / f"{key}{suffix}").is_file():
            return f"{key}{suffix}"
    raise ValueError(
        f"{json_path}: frame {key!r} is labelled but its image {folder / (key + '.png')} "
        f"(or .jpg) does not exist"
    )


def read_clip(folder: str | Path) -> Clip:
    """Parse one clip folder and its ``<clip>.json``.

    Args:
        folder: the clip folder, e.g. ``raw/001``.

    Returns:
        The clip with labels divided by 10 (to ``[-1, 1]``), frames sorted by name.

    Raises:
        ValueError: missing or invalid JSON, a missing field, a label that is not a
            number in ``[-10, 10]``, or a labelled frame without an image; the message
            names the JSON file (and the frame).

    Example:
        >>> import json, tempfile, pathlib
        >>> from PIL import Image
        >>> clip = pathlib.Path(tempfile.mkdtemp()) / "001"; clip.mkdir()
        >>> Image.new("RGB", (4, 4)).save(clip / "00000.png")
        >>> _ = (clip / "001.json").write_text(json.dumps(
        ...     {"actor": "A", "frames": {"00000": {"valence": 5, "arousal": -2.5}}}))
        >>> read_clip(clip).frames
        (('00000.png', 0.5, -0.25),)
    """
    folder = Path(folder)
    json_path = folder / f"{folder.name}.json"
    if not json_path.is_file():
        raise ValueError(f"clip folder {folder} has no label file {json_path}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path}: not valid JSON: {error}") from error
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, dict) or not frames:
        raise ValueError(f"{json_path}: expected a non-empty object under key 'frames'")
    parsed = []
    for key in sorted(frames):
        entry = frames[key]
        where = f"{json_path}, frame {key!r}"
        if not isinstance(entry, dict) or "valence" not in entry or "arousal" not in entry:
            raise ValueError(
                f"{where}: expected an object with 'valence' and 'arousal', got {entry!r}"
            )
        values = []
        for column in ("valence", "arousal"):
            value = parse_float(str(entry[column]), column, where)
            if not -AFEW_VA_SCALE <= value <= AFEW_VA_SCALE:
                raise ValueError(f"{where}: {column} must lie in [-10, 10], got {value:g}")
            values.append(value / AFEW_VA_SCALE)
        parsed.append((_frame_file(folder, key, json_path), values[0], values[1]))
    actor = meta.get("actor")
    return Clip(
        folder.name,
        folder,
        actor if isinstance(actor, str) and actor.strip() else None,
        tuple(parsed),
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.strip()).strip("_") or "unknown"


def _identity_of(clip: Clip, identity: str) -> str:
    if identity == "clip":
        return clip.name
    if clip.actor is None:
        raise ValueError(
            f"{clip.folder / (clip.name + '.json')}: `identity`='actor' needs a non-empty "
            f"'actor' field"
        )
    return _slug(clip.actor)


def split_identities(names: list[str], val_fraction: float, seed: int) -> set[str]:
    """Pick the validation identities: ``round(val_fraction * n)``, at least 1, at most n - 1.

    Example:
        >>> sorted(split_identities(["a", "b", "c", "d"], 0.5, seed=0))
        ['a', 'c']
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    unique = sorted(set(names))
    if len(unique) < 2:
        raise ValueError(f"a split by identity needs at least 2 identities, got {len(unique)}")
    count = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:count]}


def convert_afew_va(
    raw_root: str | Path,
    out_root: str | Path,
    *,
    identity: str = "clip",
    val_fraction: float = 0.2,
    seed: int = 0,
    link: str = "symlink",
    force: bool = False,
) -> Path:
    """Convert raw AFEW-VA under ``raw_root`` to the CSV layout under ``out_root``.

    Clip folders are the sub-folders of ``raw_root`` whose names are digits. The
    conversion is skipped when ``out_root/conversion.json`` records the same arguments.

    Args:
        raw_root: folder holding ``001/``, ``002/``, ...
        out_root: output root (``train/`` and ``val/`` are replaced).
        identity: ``"clip"`` (the released code's choice) or ``"actor"`` (the same actor
            across clips is one identity, so the split cannot leak a person).
        val_fraction: fraction of identities held out for validation.
        seed: seed of the identity split.
        link: ``"symlink"`` clip folders (fast, no copy) or ``"copy"`` the frames.
        force: convert even if an identical conversion exists.

    Returns:
        ``out_root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad arguments, no clip folders, or a malformed clip (see
            :func:`read_clip`).

    Example:
        >>> convert_afew_va("/nonexistent", "/tmp/out")
        Traceback (most recent call last):
        ...
        ValueError: `raw_root` /nonexistent is not a folder
    """
    raw_root, out_root = Path(raw_root).resolve(), Path(out_root)
    if identity not in IDENTITY_MODES:
        raise ValueError(f"`identity` must be one of {IDENTITY_MODES}, got {identity!r}")
    if link not in LINK_MODES:
        raise ValueError(f"`link` must be one of {LINK_MODES}, got {link!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    if not raw_root.is_dir():
        raise ValueError(f"`raw_root` {raw_root} is not a folder")
    record = {
        "source": "afew-va",
        "raw_root": str(raw_root),
        "identity": identity,
        "val_fraction": val_fraction,
        "seed": seed,
        "link": link,
    }
    with locked(out_root):
        if not force and has_record(out_root / "conversion.json", record):
            return out_root
        (out_root / "conversion.json").unlink(missing_ok=True)
        folders = sorted(p for p in raw_root.iterdir() if p.is_dir() and p.name.isdigit())
        if not folders:
            raise ValueError(f"`raw_root` {raw_root} has no clip folders (001, 002, ...)")
        clips = [read_clip(folder) for folder in folders]
        owners = [_identity_of(clip, identity) for clip in clips]
        val_ids = split_identities(owners, val_fraction, seed)
        for split, csv_name in SPLIT_FILES.items():
            split_dir = out_root / split
            if split_dir.is_symlink() or split_dir.is_file():
                split_dir.unlink()
            shutil.rmtree(split_dir, ignore_errors=True)
            split_dir.mkdir(parents=True)
            rows = []
            for clip, owner in zip(clips, owners):
                if (owner in val_ids) != (split == "val"):
                    continue
                prefix = clip.name if identity == "clip" else f"{owner}/{clip.name}"
                _place(clip, split_dir / prefix, link)
                rows.extend((f"{prefix}/{name}", v, a) for name, v, a in clip.frames)
            write_va_csv(split_dir / csv_name, rows)
        write_record(out_root / "conversion.json", record)
    return out_root


def _place(clip: Clip, target: Path, link: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        target.symlink_to(clip.folder, target_is_directory=True)
        return
    target.mkdir()
    for name, _, _ in clip.frames:
        shutil.copy2(clip.folder / name, target / name)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m elim.data.afew_va --help``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_root", type=Path, help="folder with the clip folders 001 ... 600")
    parser.add_argument("out_root", type=Path, help="output root of the CSV layout")
    parser.add_argument("--identity", choices=IDENTITY_MODES, default="clip")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--link", choices=LINK_MODES, default="symlink")
    args = parser.parse_args(argv)
    out = convert_afew_va(
        args.raw_root,
        args.out_root,
        identity=args.identity,
        val_fraction=args.val_fraction,
        seed=args.seed,
        link=args.link,
        force=True,
    )
    print(f"wrote {out / 'train' / SPLIT_FILES['train']} and {out / 'val' / SPLIT_FILES['val']}")


if __name__ == "__main__":
    main()
