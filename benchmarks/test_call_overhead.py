"""Fixed cost of one ``sinkhorn()`` call against the native op it wraps.

A small problem (ELIM's identity matching solves ``9 x 10 x 10`` per step) spends most
of a call outside the loop: validation, centring, the plan, its certified marginal
error, the result. This module measures, in one run and interleaved so that machine
load hits both alike:

* ``op``: the bare native loop (``torch.ops.sinkhorn_ot.solve``) on prepared inputs;
* ``call``: a whole ``sinkhorn(C, eps=..., backend="native", ...)`` on the same problem;
* the host reads (``bool``/``item``/``tolist`` of a tensor: each one a device sync on a
  GPU) and the torch operations (each one a kernel launch on a GPU) of one call.

Rows are written to ``<out>/<device>-call-overhead.md`` and printed.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import pytest
import torch

from sinkhorn_ot import sinkhorn
from sinkhorn_ot._loop import eps_table

#: (B, N, M) of the rows: ELIM's matching step, then two grid points.
SIZES = [(9, 10, 10), (512, 128, 128), (4096, 32, 32)]
#: (tol, max_iter): "no checks" (a fixed iteration count), a fixed tol and the default
#: stopping rule ("auto": 1e-5 here, at the cost of reading the cost scale).
SETTINGS = [(None, 20), (1e-5, 1000), ("auto", 1000)]
_ROWS: list[dict] = []


@contextmanager
def _counting_host_reads():
    """Count every Tensor -> Python conversion (each is a host sync on a GPU)."""
    calls: list[str] = []
    saved = {}
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        saved[name] = original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _torch_ops(fn) -> int:
    """Number of top-level torch operations ``fn()`` dispatches (kernel launches on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


def _median_seconds(fn, budget: float, sync) -> float:
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("size", SIZES, ids=["x".join(map(str, s)) for s in SIZES])
@pytest.mark.parametrize("tol, max_iter", SETTINGS, ids=["tol-None", "tol-1e-5", "tol-auto"])
def test_call_overhead(size, tol, max_iter, bench):
    device = bench["device"]
    if "native" not in bench["caps"].backends:
        pytest.skip("the native backend is not built here")
    batch, n, m = size
    generator = torch.Generator().manual_seed(0)
    cost = torch.rand(size, generator=generator).to(device)
    eps = 0.1
    kwargs = {"eps": eps, "backend": "native", "tol": tol, "max_iter": max_iter, "grad": "none"}
    first = sinkhorn(cost, **kwargs)  # builds and warms up
    # The op on the inputs the solver prepares (uniform weights, f0 = -eps log a), run
    # for the iterations the call needed, so that the difference is the fixed cost.
    a = torch.full((batch, n), 1 / n, device=device)
    b = torch.full((batch, m), 1 / m, device=device)
    f0 = -eps * a.log()
    table = eps_table(torch.full((batch,), eps, device=device), None, None)
    iterations = int(first.n_iter.max())
    op = torch.ops.sinkhorn_ot.solve
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_op():
        return op(cost, a, b, f0, table, iterations, None, "log")

    def run_call():
        return sinkhorn(cost, **kwargs)

    budget = bench["budget"]
    op_times, call_times = [], []
    for _ in range(3):  # interleaved rounds: load changes hit both columns alike
        op_times.append(_median_seconds(run_op, budget / 6, sync))
        call_times.append(_median_seconds(run_call, budget / 6, sync))
    op_s, call_s = min(op_times), min(call_times)
    with _counting_host_reads() as reads:
        run_call()
    row = {
        "size": "x".join(map(str, size)),
        "tol": tol if tol in (None, "auto") else f"{tol:g}",
        "n_iter": iterations,
        "op_us": op_s * 1e6,
        "call_us": call_s * 1e6,
        "overhead_us": (call_s - op_s) * 1e6,
        "host_reads": len(reads),
        "torch_ops": _torch_ops(run_call),
    }
    _ROWS.append(row)
    _write(bench)
    assert row["call_us"] > 0


def _write(bench) -> None:
    lines = [
        "# Fixed cost of a sinkhorn() call",
        "",
        f"Device: {bench['device']}, threads: {bench['threads']}. `op` is the native loop "
        "alone for the call's iteration count (`n_iter`), `call` a whole `sinkhorn(C, "
        'eps=0.1, backend="native", grad="none")`; both are the best of three interleaved '
        "medians. `host reads` are tensor-to-Python conversions (device syncs on a GPU), "
        "`torch ops` the operations one call dispatches (kernel launches on a GPU).",
        "",
        "| B×N×M | tol | n_iter | op (µs) | call (µs) | overhead (µs) | overhead share "
        "| host reads | torch ops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _ROWS:
        share = r["overhead_us"] / r["call_us"]
        lines.append(
            f"| {r['size']} | {r['tol']} | {r['n_iter']} | {r['op_us']:.0f} | "
            f"{r['call_us']:.0f} | {r['overhead_us']:.0f} | {share:.0%} | "
            f"{r['host_reads']} | {r['torch_ops']} |"
        )
    text = "\n".join(lines) + "\n"
    path = bench["out"] / f"{bench['device'].type}-call-overhead.md"
    path.write_text(text)
    print("\n" + text)
