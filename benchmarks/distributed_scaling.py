"""Scaling of ``sinkhorn(group=...)``: 1 vs 2 processes, and the communication model.

**Measured** (``run_scaling``): one point-cloud problem ``N = M`` points in ``D``
dimensions (float64 uniform points in the unit cube, uniform weights, ``eps = 0.05``),
rows split evenly over ``P`` gloo ranks started with ``torchrun``, one CPU thread each.
Each rank times ``sinkhorn(..., max_iter=T, tol=None, grad="none")`` and the same with
``T0`` iterations, interleaved for a few rounds; the per-iteration time is
``(min t(T) - min t(T0)) / (T - T0)`` (the per-call work cancels), and, separately, the
time of the iteration's one all-reduce of ``B (M + 1)`` numbers on its own.

**Modelled** (``communication_model``): bytes all-reduced per iteration for each layout
and the ring all-reduce time ``2 (P - 1) / P * bytes / bandwidth + 2 (P - 1) * latency``.

Run: ``python -m benchmarks.distributed_scaling`` (writes
``benchmarks/results/cpu-distributed.md``), or ``pytest benchmarks/ --benchmark -k
distributed``. A rank's entry point is ``python -m benchmarks.distributed_scaling --rank-worker``
under ``torchrun``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: Problem of the measured scaling (large enough that compute dwarfs the all-reduce).
SIZE, DIM, EPS = 4000, 32, 0.05
ITERS, ITERS0, ROUNDS = 12, 2, 3


def _worker(size: int, dim: int, iters: int, iters0: int, rounds: int) -> None:
    import torch.distributed as dist

    from sinkhorn_ot import PointCloud, sinkhorn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, size, dim, generator=gen, dtype=torch.float64)
    y = torch.rand(1, size, dim, generator=gen, dtype=torch.float64)
    cuts = torch.linspace(0, size, world + 1).round().long().tolist()
    rows = slice(cuts[rank], cuts[rank + 1])
    geometry = PointCloud(x[:, rows], y)
    a = torch.full((1, cuts[rank + 1] - cuts[rank]), 1 / size, dtype=torch.float64)
    group = dist.group.WORLD

    def timed(n: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        sinkhorn(geometry, a, eps=EPS, max_iter=n, tol=None, grad="none", group=group)
        dist.barrier()
        return time.perf_counter() - start

    long, short = [], []
    for _ in range(rounds):
        long.append(timed(iters))
        short.append(timed(iters0))
    buffer = torch.zeros(size + 1, dtype=torch.float64)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(50):
        dist.all_reduce(buffer)
    allreduce = (time.perf_counter() - start) / 50
    per_iter = (min(long) - min(short)) / (iters - iters0)
    if rank == 0:
        print(json.dumps({"world": world, "per_iter_s": per_iter, "allreduce_s": allreduce}))
    dist.destroy_process_group()


def _launch(world: int, size: int, dim: int) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node", str(world)]
    command += ["--master_port", str(29500 + os.getpid() % 1000 + world)]
    command += ["-m", "benchmarks.distributed_scaling", "--rank-worker"]
    command += ["--size", str(size), "--dim", str(dim)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    line = [text for text in done.stdout.splitlines() if text.startswith("{")][-1]
    return json.loads(line)


def communication_model(m: int, n: int, dim: int, ranks: int, batch: int = 1, itemsize=4):
    """Bytes each rank moves per iteration, by layout (no collective of the cost or plan).

    * rows sharded: one all-reduce of ``B (M + 1)`` float64 numbers (the column
      log-sum-exps in the shifted frame and the violation); a ring all-reduce sends and receives
      ``2 (P - 1) / P`` of it on each rank's link;
    * rows and columns sharded (``shard_y``): two rings of ``P - 1`` blocks of points with
      a log weight and a potential, ``(N / P + M / P) (D + 2)`` numbers per hop, plus an
      all-reduce of ``B`` violations.
    """
    rows = batch * (m + 1) * 8  # the all-reduced buffer is float64
    ring = (ranks - 1) * batch * ((n + m) / ranks) * (dim + 2) * itemsize
    return {"rows: all-reduced bytes": rows, "shard_y: bytes sent per rank": ring}


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce time: ``2 (P-1)/P * bytes / bandwidth + 2 (P-1) * latency``."""
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def run_scaling(size: int = SIZE, dim: int = DIM) -> str:
    """Measure 1 and 2 processes and write ``results/cpu-distributed.md``; returns the text."""
    one, two = _launch(1, size, dim), _launch(2, size, dim)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    speedup = one["per_iter_s"] / two["per_iter_s"]
    lines = [
        "# Sharded Sinkhorn on the CPU: 1 vs 2 processes",
        "",
        f"Point cloud N = M = {size}, D = {dim}, float64, eps = {EPS}, rows split evenly, "
        "gloo, one thread per process (`python -m benchmarks.distributed_scaling`). "
        f"Load average at the end: {load:.1f} (the machine is shared; times are minima "
        f"over {ROUNDS} rounds).",
        "",
        "| processes | time per iteration | its all-reduce (B (M+1) float64) | share |",
        "|---|---|---|---|",
    ]
    for row in (one, two):
        share = row["allreduce_s"] / row["per_iter_s"] if row["world"] > 1 else 0.0
        lines.append(
            f"| {row['world']} | {row['per_iter_s'] * 1e3:.1f} ms | "
            f"{row['allreduce_s'] * 1e6:.0f} µs | {share:.2%} |"
        )
    lines += ["", f"Speed-up of 2 processes over 1: **{speedup:.2f}x** (ideal 2x).", ""]
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu-distributed.md").write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank-worker", action="store_true")
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--dim", type=int, default=DIM)
    options = parser.parse_args()
    if options.rank_worker:
        _worker(options.size, options.dim, ITERS, ITERS0, ROUNDS)
    else:
        print(run_scaling(options.size, options.dim))
