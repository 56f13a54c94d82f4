"""Native (C++/CUDA) backends: availability report.

Placeholder until the native kernels land: nothing native is available yet, and
``backend="auto"`` always uses the torch backend.
"""

from __future__ import annotations

import torch


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether a native kernel exists for ``device`` and ``dtype``, and if not, why."""
    return False, "native kernels are not part of this build"


def solve_potentials(*args, **kwargs):  # pragma: no cover - never reached while unavailable
    raise RuntimeError("native backend is not available")
