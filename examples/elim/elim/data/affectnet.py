"""Loader for AffectNet's official annotation CSVs, with optional per-image ages (ELIM-Age).

Official columns: ``subDirectory_filePath, face_x, face_y, face_width, face_height,
facial_landmarks, expression, valence, arousal``; labels already lie in ``[-1, 1]``, and
``-2`` marks images whose valence/arousal is uncertain or absent (expression classes
None, Uncertain, Non-face): those rows are skipped. AffectNet has no identity labels, so
the domain of a sample is its age group when an age file (``subDirectory_filePath,age``)
is given, and the image itself otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._csvio import iter_csv_rows, parse_float, parse_label
from .base import VADataset
from .csv_dataset import read_ages
from .sampler import AGE_GROUP_NAMES, age_group

AFFECTNET_COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
UNCERTAIN = -2.0
SPLIT_FILES = {"train": "training.csv", "val": "validation.csv"}


class AffectNetDataset(VADataset):
    """AffectNet images with valence-arousal labels from an official CSV.

    Args:
        csv_path: ``training.csv`` or ``validation.csv``.
        image_dir: folder the ``subDirectory_filePath`` values are relative to
            (``Manually_Annotated_Images``).
        transform: PIL image -> tensor; default: ``[0, 1]`` float tensor, no resize.
        age_file: optional CSV ``subDirectory_filePath,age``.
        domain: ``"auto"`` (age group with an age file, else one domain per image),
            ``"age"`` or ``"image"``.
        crop_face: crop each image to its ``face_x, face_y, face_width, face_height`` box.
        missing_age: with an age file, ``"error"`` on a kept row without an age, or
            ``"drop"`` such rows.
        check_files: check that every image exists when building the dataset.

    Attributes:
        expressions: ``(N,)`` int64 tensor, AffectNet's expression class.
        n_uncertain: number of rows skipped because valence or arousal was ``-2``.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "1").mkdir()
        >>> Image.new("RGB", (8, 8)).save(d / "1" / "a.jpg")
        >>> _ = (d / "training.csv").write_text(
        ...     "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
        ...     "expression,valence,arousal\\n1/a.jpg,0,0,8,8,\\"1;2\\",1,0.5,0.25\\n"
        ...     "1/a.jpg,0,0,8,8,\\"1;2\\",9,-2,-2\\n")
        >>> ds = AffectNetDataset(d / "training.csv", d)
        >>> len(ds), ds.n_uncertain, ds.domain_kind
        (1, 1, 'image')
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path,
        *,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        age_file: str | Path | None = None,
        domain: str = "auto",
        crop_face: bool = False,
        missing_age: str = "error",
        check_files: bool = True,
    ) -> None:
        if domain not in ("auto", "age", "image"):
            raise ValueError(
                f"`domain` must be 'auto', 'age' or 'image' (AffectNet has no identities), got {domain!r}"
            )
        if domain == "age" and age_file is None:
            raise ValueError("`domain`='age' needs an `age_file`, got None")
        if missing_age not in ("error", "drop"):
            raise ValueError(f"`missing_age` must be 'error' or 'drop', got {missing_age!r}")
        csv_path, image_dir = Path(csv_path), Path(image_dir)
        ages_by_path = None
        if age_file is not None:
            key_column, ages_by_path = read_ages(age_file)
            if key_column != "subDirectory_filePath":
                raise ValueError(
                    f"{age_file}: AffectNet ages must be keyed by 'subDirectory_filePath', got '{key_column}'"
                )
        rel_paths, labels, expressions, boxes, ages, rows = [], [], [], [], [], []
        self.n_uncertain = 0
        self.n_missing_age = 0
        for location, record in iter_csv_rows(csv_path, AFFECTNET_COLUMNS):
            valence = parse_float(record["valence"], "valence", location)
            arousal = parse_float(record["arousal"], "arousal", location)
            if valence == UNCERTAIN or arousal == UNCERTAIN:
                self.n_uncertain += 1
                continue
            parse_label(record["valence"], "valence", location)
            parse_label(record["arousal"], "arousal", location)
            rel = record["subDirectory_filePath"]
            if ages_by_path is not None and rel not in ages_by_path:
                if missing_age == "drop":
                    self.n_missing_age += 1
                    continue
                raise ValueError(f"{location}: image {rel!r} has no age in {age_file}")
            if check_files and not (image_dir / rel).is_file():
                raise ValueError(f"{location}: image file {image_dir / rel} does not exist")
            expression = parse_float(record["expression"], "expression", location)
            if expression != int(expression):
                raise ValueError(
                    f"{location}: expression must be an integer class, got {record['expression']!r}"
                )
            if crop_face:
                boxes.append(_face_box(record, location))
            rel_paths.append(rel)
            labels.append((valence, arousal))
            expressions.append(int(expression))
            ages.append(ages_by_path[rel] if ages_by_path is not None else -1)
            rows.append((location.row, location.line))
        if not rel_paths:
            raise ValueError(f"{csv_path}: no rows with valence/arousal labels")
        if domain == "auto":
            domain = "age" if ages_by_path is not None else "image"
        if domain == "age":
            identities = np.array([age_group(a) for a in ages], dtype=np.int64)
            names, kind = list(AGE_GROUP_NAMES), "age_group"
        else:
            identities, names, kind = np.arange(len(rel_paths)), list(rel_paths), "image"
        super().__init__(
            [image_dir / rel for rel in rel_paths],
            np.asarray(labels),
            identities,
            names,
            domain_kind=kind,
            ages=None if ages_by_path is None else np.asarray(ages),
            transform=transform,
            source=csv_path,
            rows=np.asarray(rows),
            crop_boxes=np.asarray(boxes, dtype=np.int64) if crop_face else None,
        )
        self.relative_paths = rel_paths
        self.expressions = torch.as_tensor(expressions, dtype=torch.int64)


def _face_box(record: dict[str, str], location) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` from the face columns; width and height must be > 0."""
    x, y, w, h = (
        parse_float(record[c], c, location)
        for c in ("face_x", "face_y", "face_width", "face_height")
    )
    if w <= 0 or h <= 0:
        raise ValueError(f"{location}: face_width and face_height must be > 0, got {w:g} x {h:g}")
    return int(x), int(y), int(x + w), int(y + h)


def affectnet_image_dir(root: str | Path) -> Path:
    """``root/Manually_Annotated_Images`` when it exists, else ``root`` itself."""
    root = Path(root)
    nested = root / "Manually_Annotated_Images"
    return nested if nested.is_dir() else root
