"""Adaptive rounds on top of pytest-benchmark's pedantic mode.

Cases differ by 1000x in run time, so a fixed round count either wastes minutes on the
big cases or measures the small ones once. :func:`measure` runs the function once as a
warm-up (which also tells how long it takes), then asks pytest-benchmark for as many
rounds as fit in ``budget_s`` (at least 1, at most ``max_rounds``). The report uses the
minimum over rounds: on a shared machine noise only ever adds time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    min: float
    median: float
    rounds: int
    warmup: float


def synchronizer(device) -> Callable[[], None]:
    """A no-op on CPU; ``torch.cuda.synchronize`` on CUDA (kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def measure(
    benchmark,
    fn: Callable[..., Any],
    *,
    device,
    budget_s: float,
    max_rounds: int = 15,
    setup: Callable[[], tuple[tuple, dict]] | None = None,
) -> tuple[Timing, Any]:
    """Time ``fn`` with pytest-benchmark; return the timing and ``fn``'s last result.

    Args:
        benchmark: the pytest-benchmark fixture.
        fn: the function to time. With ``setup``, called as ``fn(*args, **kwargs)`` on
            what ``setup`` returns, and ``setup`` is not timed (pytest-benchmark's
            ``pedantic(setup=...)``), e.g. a forward pass before a timed backward.
        device: where the work runs (CUDA work is synchronised inside the timing).
        budget_s: time to spend on the timed rounds, roughly.
        max_rounds: cap on the rounds for very fast functions.
    """
    sync = synchronizer(device)

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        sync()
        return out

    args, kwargs = setup() if setup is not None else ((), {})
    start = time.perf_counter()
    run(*args, **kwargs)
    warmup = time.perf_counter() - start
    rounds = int(max(1, min(max_rounds, budget_s // max(warmup, 1e-9))))
    if setup is None:
        out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        out = benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=0)
    stats = benchmark.stats.stats
    return Timing(stats.min, stats.median, rounds, warmup), out
