"""Multi-process training helpers: set-up under ``torchrun``, gathers, replica checks.

``train.py`` runs as one process, or as ``torchrun --nproc_per_node N train.py ...``;
:func:`setup` reads the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables that torchrun
sets and initialises the process group with ``gloo`` on CPU and ``nccl`` on GPU. Every
helper here also works, as a no-op, in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "gather_rows",
    "replicas_in_sync",
    "resolve_device",
    "setup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this machine; selects the GPU.
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, prints and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` if a GPU is visible, else ``cpu``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {name!r} but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group if launched by torchrun, else describe one process.

    The backend is ``nccl`` for CUDA devices and ``gloo`` for CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under torchrun each
            rank takes GPU ``LOCAL_RANK``.

    Returns:
        The :class:`DistInfo` of this process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_gather_object(obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging); identity in a single process."""
    if not _active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor along dim 0, in rank order.

    Ranks may hold different numbers of rows (an evaluation set that does not split
    evenly); rows are padded for the collective and trimmed afterwards. Every rank gets
    the full result.

    Args:
        x: this rank's rows.

    Returns:
        ``(sum_r n_r, ...)`` on ``x``'s device.
    """
    if not _active():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def replicas_in_sync(module: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (always true in one process).

    DDP keeps replicas identical by construction; this cheap check (one float64 checksum
    per parameter, gathered once) catches a rank that skipped a backward or an
    optimiser step, which would otherwise go unnoticed until results look wrong.
    """
    if not _active():
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    gathered = all_gather_object(sums)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])
