"""Run a function on several gloo ranks (CPU processes) and fail clearly on a hang.

``run_ranks(worker, world, *args)`` spawns ``world`` processes, each calling
``worker(rank, world, *args)`` inside an initialised gloo process group with one CPU
thread. An exception on any rank fails the caller with that rank's traceback; ranks that
do not finish within ``timeout`` seconds are killed and reported (a deadlock in a
collective must fail the test, not hang the suite).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
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
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every check on this rank passed. Wait for the other ranks (rank 0 hosts the store;
    # tearing it down while a peer is still inside a collective aborts that peer), free
    # what the worker held, and destroy the group while the interpreter is whole.
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    # Skip interpreter finalization: there gloo's worker threads can be destroyed while
    # joinable, and the process then dies with SIGABRT ("terminate called without an
    # active exception") after every assertion passed (seen in a CI run
    # of this suite). Nothing is left to check at this point.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
