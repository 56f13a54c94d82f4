"""Run a function on several gloo ranks (CPU processes) and fail clearly on a hang.

``run_ranks(worker, world, *args)`` spawns ``world`` processes, each calling
``worker(rank, world, *args)`` inside an initialised gloo process group with one CPU
thread. An exception on any rank fails the caller with that rank's traceback; ranks that
do not finish within ``timeout`` seconds are killed and reported (a deadlock in a
collective must fail the test, not hang the suite).
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, worker, args):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, *args, timeout: float = 240.0) -> None:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks; raise on any failure."""
    context = mp.start_processes(
        _entry, args=(world, free_port(), worker, args), nprocs=world, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"ranks still running after {timeout:g} s (a collective hung?)")
