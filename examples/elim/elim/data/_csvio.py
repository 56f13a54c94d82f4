"""CSV reading shared by the dataset loaders, with errors that name the file and the row.

Row numbers in messages count data rows from 1 (the header is not a row) and also give
the physical line, so ``sed -n <line>p file`` shows the offending record.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

VA_COLUMNS = ("subDirectory_filePath", "valence", "arousal")


class RowRef(NamedTuple):
    """Where a record came from; ``str()`` gives ``'<file>, row <row> (line <line>)'``."""

    path: Path
    row: int
    line: int

    def __str__(self) -> str:
        return f"{self.path}, row {self.row} (line {self.line})"


def iter_csv_rows(
    path: str | Path, required: Sequence[str]
) -> Iterator[tuple[RowRef, dict[str, str]]]:
    """Yield ``(location, record)`` for each non-blank data row of a headed CSV file.

    Args:
        path: CSV file with a header line.
        required: column names that must appear in the header (extra columns are kept).

    Yields:
        ``location`` (a :class:`RowRef`; its ``str()`` is the prefix of error messages)
        and the row as a dict from column name to the stripped cell text.

    Raises:
        ValueError: the file is missing or empty, the header lacks a required column, or
            a row has a different number of fields than the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header with columns {list(required)}")
        header = [name.strip() for name in header]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(
                f"{path}: header is missing column(s) {missing}; expected at least "
                f"{list(required)}, got {header}"
            )
        row_number = 0
        for fields in reader:
            if not any(cell.strip() for cell in fields):
                continue  # trailing blank lines are common in hand-edited files
            row_number += 1
            location = RowRef(path, row_number, reader.line_num)
            if len(fields) != len(header):
                raise ValueError(
                    f"{location}: expected {len(header)} fields {header}, got "
                    f"{len(fields)}: {fields!r}"
                )
            yield location, {name: cell.strip() for name, cell in zip(header, fields)}


def parse_float(text: str, column: str, location: RowRef | str) -> float:
    """Parse one numeric cell; NaN and infinities are rejected."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{location}: column {column!r} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{location}: column {column!r} must be finite, got {text!r}")
    return value


def parse_label(text: str, column: str, location: RowRef | str, bound: float = 1.0) -> float:
    """Parse a valence/arousal cell and check it lies in ``[-bound, bound]``."""
    value = parse_float(text, column, location)
    if not -bound <= value <= bound:
        raise ValueError(f"{location}: {column} must lie in [{-bound:g}, {bound:g}], got {value:g}")
    return value


def parse_age(text: str, column: str, location: RowRef | str) -> int:
    """Parse an age cell: a non-negative whole number of years (``'34'`` or ``'34.0'``)."""
    value = parse_float(text, column, location)
    if value < 0 or value != int(value):
        raise ValueError(f"{location}: {column} must be a whole number of years >= 0, got {text!r}")
    return int(value)


def write_va_csv(path: Path, rows: Sequence[tuple[str, float, float]]) -> None:
    """Write ``(relative_path, valence, arousal)`` rows in the released code's layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(VA_COLUMNS)
        for rel_path, valence, arousal in rows:
            writer.writerow([rel_path, f"{valence:.6f}", f"{arousal:.6f}"])
