"""Throughput of ``torch.exp`` and of our kernels' own vector exponential
(``torch.ops.sinkhorn_ot.exp_terms``) on a large contiguous tensor: the floors of a
log-domain iteration (each iteration needs at least ``2 * B * N * M`` exponentials)."""

import pytest
import torch

from sinkhorn_ot import native

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


def test_exp_floor_of_our_kernels(benchmark, bench):
    """The exponential the CPU kernels use (``ExpTerm``), on ``x <= 0`` as they do."""
    if (
        bench["device"].type != "cpu"
        or not native.availability(torch.device("cpu"), torch.float32)[0]
    ):
        pytest.skip("native-cpu unavailable")
    x = -torch.rand(NUMEL) * 80
    exp_terms = torch.ops.sinkhorn_ot.exp_terms
    timing, _ = measure(
        benchmark, lambda: exp_terms(x), device="cpu", budget_s=bench["budget"], max_rounds=20
    )
    rate = NUMEL / timing.min
    benchmark.extra_info["exps_per_s"] = rate
    registry().add("throughput", "-", "ours exp", rate, numel=NUMEL, rounds=timing.rounds)
