"""Multi-process training: the helpers in one process, and a 2-process gloo DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from elim import distributed
from elim.data import DistributedIdentityBatchSampler
from test_train_helpers import TRAIN_PY, tiny_config, write_config


def test_single_process_helpers_are_identities():
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(x) is x
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.all_reduce_mean({"l": 2.0}, torch.device("cpu")) == {"l": 2.0}
    assert distributed.replicas_in_sync(torch.nn.Linear(2, 2))
    distributed.barrier()


def test_resolve_device():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            distributed.resolve_device("cuda")


def _gloo_worker(rank, world, port, queue):
    """Runs in a spawned process: exercise gather_rows / replicas_in_sync with 2 ranks."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = torch.full((rank + 1, 2), float(rank))  # uneven: 1 row on rank 0, 2 on rank 1
        gathered = distributed.gather_rows(rows)
        torch.manual_seed(0)
        same = distributed.replicas_in_sync(torch.nn.Linear(3, 3))
        torch.manual_seed(rank)
        different = distributed.replicas_in_sync(torch.nn.Linear(3, 3))
        mean = distributed.all_reduce_mean({"x": float(rank)}, torch.device("cpu"))
        queue.put((rank, gathered.tolist(), same, different, mean))
    finally:
        dist.destroy_process_group()


def test_gather_and_sync_check_across_two_gloo_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _rank, gathered, same, different, mean in results:
        assert gathered == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank order, unpadded
        assert same is True and different is False
        assert mean == {"x": 0.5}


def test_two_process_ddp_training_run(tmp_path):
    """torchrun, 2 CPU processes (gloo): disjoint identities per rank, metrics gathered."""
    root = tmp_path / "data"
    cfg = write_config(
        tmp_path / "cfg.json",
        tiny_config(
            root,
            backbone="resnet18",
            method="elim",
            batch_size=4,
            max_steps=3,
            eval_every=2,
            num_domains=2,
        ),
    )
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TRAIN_PY),
        "--config",
        str(cfg),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["replicas_in_sync"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 8
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    # 3 held-out identities x 4 images: every image evaluated once across the two ranks.
    assert [e["step"] for e in evals] == [2, 3] and all(e["n"] == 12 for e in evals)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["loss_elim"] > 0
    # Rank 0 wrote the checkpoint with both ranks' random-number states.
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["matching"], state["rng"][1]["matching"])


def test_ranks_get_disjoint_identities():
    domains = torch.arange(6).repeat_interleave(4)
    samplers = [
        DistributedIdentityBatchSampler(domains, 2, 2, rank=r, world_size=2, seed=0)
        for r in range(2)
    ]
    for b0, b1 in zip(*samplers):
        assert not set(domains[b0].tolist()) & set(domains[b1].tolist())
