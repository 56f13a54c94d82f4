"""What the suite runs on this machine: device, backends, grad modes, implementations.

Everything is detected at run time, so that rows for a backend or grad mode that does
not exist yet are simply absent (and the report header says why), and they appear
without any change here once the code lands:

* backend ``"native"`` exists iff ``sinkhorn_ot.native.availability(device, float32)[0]``;
* a grad mode exists iff ``sinkhorn(..., grad=mode)`` on a tiny problem does not raise
  ``NotImplementedError`` (and, for the native backend, runs at all).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from functools import cache

import torch

from sinkhorn_ot import sinkhorn

from .cases import forward_specs
from .impls import Impl, ours_impls
from .peers import peer_impls

#: Settings of the two forward modes (issue: 100 fixed iterations; tol 1e-4).
PER_ITER = 100
TOL = 1e-4
#: Modes in table order.
MODES = ("per_iter", "to_tol")
#: Grad modes we look for, in table order.
GRAD_MODES = ("unroll", "envelope", "implicit")
#: Iteration counts of the memory-vs-iterations probes.
MEMORY_ITERS = (10, 1000)


def resolve_device(option: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(option)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device, threads: int) -> str:
    """File stem of the results: ``cpu-<model>-<threads>core`` or ``cuda-<gpu name>``."""
    if device.type == "cuda":
        label = torch.cuda.get_device_name(device)
        prefix = "cuda"
    else:
        label, prefix = cpu_model(), "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    slug = re.sub(r"-(processor|cpu|\d+-core)(?=-|$)", "", slug)
    name = f"{prefix}-{slug}" if slug else prefix
    return f"{name}-{threads}core" if device.type == "cpu" else name


@dataclass
class Capabilities:
    """What exists on this device, and why the rest does not."""

    device: torch.device
    backends: list[str]
    grad_modes: dict[str, list[str]]  # grad mode -> backends that support it
    impls: list[Impl]
    missing: dict[str, str] = field(default_factory=dict)

    def impl(self, key: str) -> Impl:
        return next(i for i in self.impls if i.key == key)


def _grad_mode_works(mode: str, backend: str, device: torch.device) -> tuple[bool, str]:
    C = torch.rand(2, 3, 4, device=device, requires_grad=True)
    try:
        res = sinkhorn(C, eps=0.5, grad=mode, backend=backend, max_iter=5, tol=None)
        res.value.sum().backward()
    except NotImplementedError as exc:
        return False, str(exc).split(";")[0]
    except (RuntimeError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@cache
def detect(device_str: str) -> Capabilities:
    """Probe backends, grad modes and peers once per session (this may build the
    native extension, so it only runs when ``--benchmark`` is given)."""
    device = torch.device(device_str)
    missing: dict[str, str] = {}
    backends = ["torch"]
    try:
        from sinkhorn_ot import native

        ok, reason = native.availability(device, torch.float32)
    except Exception as exc:  # a broken build must not take the benchmarks down
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if ok:
        backends.append("native")
    else:
        missing["backend native"] = reason
    grad_modes: dict[str, list[str]] = {}
    for mode in GRAD_MODES:
        for backend in backends:
            if mode == "unroll" and backend == "native":
                continue  # by design (docs/choosing.md): native has no autograd through its loop
            works, why = _grad_mode_works(mode, backend, device)
            if works:
                grad_modes.setdefault(mode, []).append(backend)
            else:
                missing[f"grad={mode} ({backend})"] = why
    peers, missing_peers = peer_impls()
    missing.update({f"peer {k}": v for k, v in missing_peers.items()})
    return Capabilities(device, backends, grad_modes, ours_impls(backends, device) + peers, missing)


def forward_points(device: torch.device) -> list[tuple[str, str, str]]:
    """``(case, mode, impl key)`` of every forward measurement, in run order."""
    caps = detect(str(device))
    points = []
    for spec in forward_specs(device):
        for mode in MODES:
            for impl in caps.impls:
                if impl.applies(spec):
                    points.append((spec.name, mode, impl.key))
    return points


#: Cases of the backward timings: the differentiation target, the many-small-problems
#: grid point and the two ELIM shapes (the application differentiates through those).
#: The larger grid points are left out to keep the CPU suite under 10 minutes: unrolling
#: 100 log-domain iterations keeps 200 cost-sized tensors alive.
BACKWARD_CASES = {
    "cpu": ["256x32x32", "64x128x128", "elim-9x10x10", "elim-ragged-45"],
    "cuda": ["4096x32x32", "1024x128x128", "64x512x512", "elim-9x10x10", "elim-ragged-45"],
}
#: Grad modes whose memory is measured against the iteration count (the issue asks for
#: unroll, which grows with iterations, and implicit, which must not).
MEMORY_GRAD_MODES = ("unroll", "implicit")


def backward_points(device: torch.device) -> list[tuple[str, str, str, str, str]]:
    """``(case, grad mode, backend, method, what)`` with ``what`` in ``fwd+bwd``/``bwd``."""
    caps = detect(str(device))
    points = []
    for case in BACKWARD_CASES[device.type]:
        for mode, backends in caps.grad_modes.items():
            for backend in backends:
                for method in ("log", "kernel"):
                    for what in ("fwd+bwd", "bwd"):
                        points.append((case, mode, backend, method, what))
    return points


def memory_points(device: torch.device) -> list[tuple[str, str, str, int]]:
    """``(grad mode, backend, shape key, iterations)`` of the memory probes.

    ``unroll`` at 1000 iterations runs on the small shape only (about 8 GB at the target
    shape, see :data:`benchmarks.cases.MEMORY_SHAPES`).
    """
    caps = detect(str(device))
    points = []
    for mode in MEMORY_GRAD_MODES:
        for backend in caps.grad_modes.get(mode, []):
            for shape_key in ("small", "target"):
                for iters in MEMORY_ITERS:
                    if mode == "unroll" and shape_key == "target" and iters > 100:
                        continue
                    points.append((mode, backend, shape_key, iters))
    return points


def environment(device: torch.device, threads: int) -> dict:
    """Run metadata for the report header and the JSON."""
    import numpy

    info = {
        "device": str(device),
        "device_name": device_name(device, threads),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    for mod in ("ot", "geomloss", "sinkhorn_ot"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
