"""On-disk caches of derived datasets: a lock for concurrent ranks and a parameters record."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so that only one process (rank) builds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def normalised(record: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so that tuples compare equal to the lists read back from disk."""
    return json.loads(json.dumps(record))


def has_record(path: Path, record: dict[str, Any]) -> bool:
    """Whether the JSON file at ``path`` exists and holds exactly ``record``."""
    try:
        return json.loads(path.read_text()) == normalised(record)
    except (OSError, ValueError):
        return False


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically; callers write it last, so it marks a complete build."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)
