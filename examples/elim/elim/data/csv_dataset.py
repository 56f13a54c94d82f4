"""Reader for the CSV layout of the authors' released code (``--data csv``).

Layout::

    {root}/train/training.csv     subDirectory_filePath,valence,arousal  (extra columns ignored)
    {root}/val/validation.csv
    {root}/{train|val}/<identity>/<file>   images; identity = first path component
    {root}/{train|val}/ages.csv   optional: identity,age  or  subDirectory_filePath,age
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._csvio import VA_COLUMNS, iter_csv_rows, parse_age, parse_label
from .base import VADataset
from .sampler import AGE_GROUP_NAMES, age_group

SPLIT_FILES = {"train": "training.csv", "val": "validation.csv"}
AGE_FILE = "ages.csv"


def read_ages(path: str | Path) -> tuple[str, dict[str, int]]:
    """Read an age file keyed by identity or by image path.

    Args:
        path: CSV with header ``identity,age`` or ``subDirectory_filePath,age``.

    Returns:
        ``(key_column, {key: age})``.

    Raises:
        ValueError: missing file or column, malformed age, or a key listed twice with
            different ages; messages name the file and the row.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ages.csv"
        >>> _ = p.write_text("identity,age\\nid_000,34\\n")
        >>> read_ages(p)
        ('identity', {'id_000': 34})
    """
    path = Path(path)
    rows = iter_csv_rows(path, ["age"])
    ages: dict[str, int] = {}
    key_column = None
    for location, record in rows:
        if key_column is None:
            key_column = next(
                (k for k in ("identity", "subDirectory_filePath") if k in record), None
            )
            if key_column is None:
                raise ValueError(
                    f"{path}: expected a column 'identity' or 'subDirectory_filePath' next to "
                    f"'age', got {list(record)}"
                )
        key = record[key_column]
        age = parse_age(record["age"], "age", location)
        if ages.setdefault(key, age) != age:
            raise ValueError(
                f"{location}: {key!r} is listed again with a different age ({age} vs {ages[key]})"
            )
    if key_column is None:
        raise ValueError(f"{path}: no rows")
    return key_column, ages


class VACsvDataset(VADataset):
    """Images listed in a ``subDirectory_filePath,valence,arousal`` CSV.

    Every row is validated when the dataset is built: a malformed row, a label outside
    ``[-1, 1]`` or a missing image raises :class:`ValueError` naming the CSV file, the row
    and (for images) the image path.

    Args:
        csv_path: the label file.
        image_dir: folder the CSV paths are relative to; default the CSV's folder.
        transform: PIL image -> tensor; default: ``[0, 1]`` float tensor, no resize.
        age_file: optional ages (``identity,age`` or ``subDirectory_filePath,age``).
        domain: ``"identity"`` (first path component) or ``"age"`` (5 age groups;
            needs ``age_file``).
        check_files: check that every image exists when building the dataset.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "clip1").mkdir()
        >>> Image.new("RGB", (8, 8)).save(d / "clip1" / "0.png")
        >>> _ = (d / "training.csv").write_text("subDirectory_filePath,valence,arousal\\nclip1/0.png,0.5,-0.1\\n")
        >>> ds = VACsvDataset(d / "training.csv")
        >>> image, label, identity = ds[0]
        >>> tuple(image.shape), label.tolist(), ds.identity_names[identity]
        ((3, 8, 8), [0.5, -0.10000000149011612], 'clip1')
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_dir: str | Path | None = None,
        *,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        age_file: str | Path | None = None,
        domain: str = "identity",
        check_files: bool = True,
    ) -> None:
        if domain not in ("identity", "age"):
            raise ValueError(f"`domain` must be 'identity' or 'age', got {domain!r}")
        if domain == "age" and age_file is None:
            raise ValueError("`domain`='age' needs an `age_file`, got None")
        csv_path = Path(csv_path)
        image_dir = csv_path.parent if image_dir is None else Path(image_dir)
        rel_paths, labels, rows, owners = [], [], [], []
        for location, record in iter_csv_rows(csv_path, VA_COLUMNS):
            rel = record["subDirectory_filePath"]
            parts = Path(rel).parts
            if len(parts) < 2:
                raise ValueError(
                    f"{location}: subDirectory_filePath must look like '<identity>/<file>', got {rel!r}"
                )
            labels.append(
                (
                    parse_label(record["valence"], "valence", location),
                    parse_label(record["arousal"], "arousal", location),
                )
            )
            if check_files and not (image_dir / rel).is_file():
                raise ValueError(f"{location}: image file {image_dir / rel} does not exist")
            rel_paths.append(rel)
            owners.append(parts[0])
            rows.append((location.row, location.line))
        if not rel_paths:
            raise ValueError(f"{csv_path}: no data rows")
        ages = None if age_file is None else _per_sample_ages(Path(age_file), rel_paths, owners)
        if domain == "age":
            identities = np.array([age_group(a) for a in ages], dtype=np.int64)
            names, kind = list(AGE_GROUP_NAMES), "age_group"
        else:
            names = sorted(set(owners))
            index = {name: i for i, name in enumerate(names)}
            identities = np.array([index[o] for o in owners], dtype=np.int64)
            kind = "identity"
        super().__init__(
            [image_dir / rel for rel in rel_paths],
            np.asarray(labels),
            identities,
            names,
            domain_kind=kind,
            ages=ages,
            transform=transform,
            source=csv_path,
            rows=np.asarray(rows),
        )
        self.relative_paths = rel_paths

    @classmethod
    def from_root(
        cls,
        root: str | Path,
        split: str,
        *,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        age_file: str | Path | None = None,
        domain: str = "identity",
        check_files: bool = True,
    ) -> VACsvDataset:
        """Open split ``"train"`` or ``"val"`` of a CSV-layout root.

        ``age_file`` defaults to ``{root}/{split}/ages.csv`` when that file exists.

        Example:
            >>> VACsvDataset.from_root("/nonexistent", "test")
            Traceback (most recent call last):
            ...
            ValueError: `split` must be one of ['train', 'val'], got 'test'
        """
        if split not in SPLIT_FILES:
            raise ValueError(f"`split` must be one of {list(SPLIT_FILES)}, got {split!r}")
        folder = Path(root) / split
        if age_file is None and (folder / AGE_FILE).is_file():
            age_file = folder / AGE_FILE
        return cls(
            folder / SPLIT_FILES[split],
            folder,
            transform=transform,
            age_file=age_file,
            domain=domain,
            check_files=check_files,
        )


def _per_sample_ages(age_file: Path, rel_paths: list[str], owners: list[str]) -> np.ndarray:
    key_column, ages = read_ages(age_file)
    keys = owners if key_column == "identity" else rel_paths
    missing = sorted({k for k in keys if k not in ages})
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        raise ValueError(
            f"{age_file}: no age for {len(missing)} {key_column} value(s) of the dataset, e.g. {shown}"
        )
    return np.array([ages[k] for k in keys], dtype=np.int64)
