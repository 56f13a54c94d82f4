"""Sinkhorn sharded over processes: run with ``torchrun --nproc_per_node K``.

    torchrun --nproc_per_node 2 examples/distributed_sinkhorn.py

Each rank holds a contiguous slice of the rows of ``x`` and of ``a``; ``y`` is
replicated. The sharded solve is checked against the whole problem solved in one
process (every rank builds it here only to check; a real run never needs it). On a
machine with GPUs each rank uses ``cuda:LOCAL_RANK`` and NCCL (``--nproc_per_node 1``
on one GPU still goes through NCCL); elsewhere gloo on the CPU
(``SHARDED_CHECK_DEVICE=cpu`` forces it). Prints one line per rank on success. Run by
tests/test_distributed.py (gloo) and benchmarks/gpu_check.sh (NCCL).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sinkhorn_ot import PointCloud, sinkhorn


def main() -> None:
    cuda = torch.cuda.is_available() and os.environ.get("SHARDED_CHECK_DEVICE") != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    n, m = 40 * world + 3, 31
    x = torch.randn(2, n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(2, m, 3, generator=gen, dtype=torch.float64)
    x, y = x.to(device), y.to(device)
    full = sinkhorn(PointCloud(x, y), eps=0.2, tol=1e-10, backend="torch")
    cuts = torch.linspace(0, n, world + 1).round().long().tolist()
    rows = slice(cuts[rank], cuts[rank + 1])
    a = torch.full((2, n), 1 / n, dtype=torch.float64, device=device)
    sharded = sinkhorn(
        PointCloud(x[:, rows], y), a[:, rows], eps=0.2, tol=1e-10, group=dist.group.WORLD
    )
    gaps = [
        (sharded.f - full.f[:, rows]).abs().max(),
        (sharded.g - full.g).abs().max(),
        (sharded.value - full.value).abs().max(),
    ]
    worst = max(float(gap) for gap in gaps)
    same_iter = bool(torch.equal(sharded.n_iter, full.n_iter))
    dist.destroy_process_group()
    if worst > 1e-10 or not same_iter:
        raise SystemExit(f"rank {rank}: sharded differs from single-process by {worst:.3g}")
    print(f"rank {rank}/{world} on {device}: sharded == single-process (max gap {worst:.2g})")


if __name__ == "__main__":
    main()
