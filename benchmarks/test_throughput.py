"""Throughput of ``torch.exp`` on a large contiguous tensor: the floor of a log-domain
iteration (each iteration needs at least ``2 * B * N * M`` exponentials)."""

import torch

from .registry import get as registry
from .timing import measure

#: 2**24 float32 = 64 MiB, far beyond the caches, like the large cases.
NUMEL = 1 << 24


def test_exp_throughput(benchmark, bench):
    x = torch.randn(NUMEL, device=bench["device"])
    out = torch.empty_like(x)
    timing, _ = measure(
        benchmark,
        lambda: torch.exp(x, out=out),
        device=bench["device"],
        budget_s=bench["budget"],
        max_rounds=20,
    )
    rate = NUMEL / timing.min
    benchmark.extra_info["exps_per_s"] = rate
    registry().add("throughput", "-", "torch.exp", rate, numel=NUMEL, rounds=timing.rounds)
