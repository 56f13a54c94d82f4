"""Unbalanced OT: batched dense problems vs a loop of POT, point clouds vs GeomLoss.

See :mod:`benchmarks.unbalanced` for the rows. Before the timings, the plans of every
dense implementation must agree with ours[torch] (same iterations, same maps). Results
go to ``<out>/<device>-unbalanced.md``; the terminal summary prints the ratios.
"""

from __future__ import annotations

import pytest
import torch

from . import unbalanced as ub
from .registry import get as registry
from .suite import detect
from .timing import measure


@pytest.fixture
def cpu_only(bench):
    if bench["device"].type != "cpu":
        pytest.skip("the unbalanced section is CPU-only")


def _impl(impls, key):
    found = [i for i in impls if i[0] == key]
    if not found:
        pytest.skip(f"{key} is not available here")
    return found[0]


def test_ub_dense_agreement(bench, cpu_only):
    """Every dense row's plan after the same iterations agrees with ours[torch]."""
    case = ub.dense_case(4, 64, 48)
    impls = ub.dense_impls(detect("cpu").backends)
    reference = ub.ours_dense(case, "torch")
    for key, label, fn in impls:
        plan = fn(case)
        agreement = float((plan - reference).abs().max() / reference.abs().max())
        registry().add("ub-agreement", case.name, label, agreement, key=key)
        assert agreement <= 1e-8, (label, agreement)


KEYS = ["ours-torch", "ours-native", "ours-native-kernel", "pot-loop", "pot-solve"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", ub.DENSE_CASES, ids=lambda s: "x".join(map(str, s)))
def test_ub_dense(shape, key, benchmark, bench, cpu_only):
    if key == "ours-torch" and shape[1] > 128:
        pytest.skip("the torch log-domain loop: tens of seconds here")
    case = ub.dense_case(*shape)
    key, label, fn = _impl(ub.dense_impls(detect("cpu").backends), key)
    benchmark.group = f"unbalanced dense {case.name}"
    timing, _ = measure(benchmark, lambda: fn(case), device="cpu", budget_s=bench["budget"])
    registry().add("ub-dense", case.name, label, timing.min, key=key, ours=key.startswith("ours"))


@pytest.mark.parametrize("key", ["ours-torch", "ours-native", "geomloss"])
@pytest.mark.parametrize("pc", ub.PC_CASES, ids=lambda s: f"N{s[0]}-D{s[1]}")
def test_ub_points(pc, key, benchmark, bench, cpu_only):
    if key == "ours-torch" and pc[0] > 2000:
        pytest.skip("block-wise torch soft-mins: minutes at this size")
    x, y = ub.pc_case(*pc)
    key, label, fn = _impl(ub.pc_impls(detect("cpu").backends), key)
    benchmark.group = f"unbalanced points N={pc[0]}"
    timing, (value, n_iter) = measure(
        benchmark, lambda: fn(x, y), device="cpu", budget_s=bench["budget"]
    )
    registry().add(
        "ub-points", f"N={pc[0]}, D={pc[1]}", label, timing.min, key=key,
        ours=key.startswith("ours"), n_iter=n_iter,
        objective=float(torch.as_tensor(value).sum()),
    )  # fmt: skip
