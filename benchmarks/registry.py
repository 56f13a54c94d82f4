"""Session-wide store of every measurement, read at the end to write the report.

pytest-benchmark keeps its own per-test statistics (and writes them to the JSON); this
registry keeps the *structured* facts the tables need (case, mode, implementation,
iterations, errors, memory) without parsing test ids back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """One measurement.

    Attributes:
        section: ``"forward"``, ``"backward"``, ``"memory"``, ``"agreement"`` or ``"throughput"``.
        case: case name (``"64x128x128"``, ``"elim-ragged-45"``, ...).
        impl: implementation label, e.g. ``"ours[torch]"`` or ``"POT solve_batch"``.
        value: the main number: seconds (time), MB (memory), a ratio (agreement).
        info: everything else (mode, method, rounds, iterations, errors, ...).
    """

    section: str
    case: str
    impl: str
    value: float
    info: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Append-only list of :class:`Record` plus run metadata."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.meta: dict[str, Any] = {"started": time.time()}

    def add(self, section: str, case: str, impl: str, value: float, **info: Any) -> Record:
        rec = Record(section, case, impl, float(value), dict(info))
        self.records.append(rec)
        return rec

    def select(self, section: str, **match: Any) -> list[Record]:
        """Records of ``section`` whose ``info`` (or ``case``/``impl``) match ``match``."""
        out = []
        for r in self.records:
            if r.section != section:
                continue
            fields = {"case": r.case, "impl": r.impl, **r.info}
            if all(fields.get(k) == v for k, v in match.items()):
                out.append(r)
        return out

    def one(self, section: str, **match: Any) -> Record | None:
        found = self.select(section, **match)
        return found[-1] if found else None

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "records": [asdict(r) for r in self.records]}


#: The registry of the running pytest session (reset by ``conftest.pytest_configure``).
REGISTRY = Registry()


def reset() -> Registry:
    global REGISTRY
    REGISTRY = Registry()
    return REGISTRY


def get() -> Registry:
    return REGISTRY
