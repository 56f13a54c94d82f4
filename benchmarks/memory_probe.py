"""Peak memory of one forward + backward, measured in a fresh process.

Run as ``python -m benchmarks.memory_probe --grad implicit --iters 1000 ...``; prints one
JSON line. A subprocess per measurement because peak counters are per process, and a
process that already ran other benchmarks carries their allocator state.

* CPU: peak resident set size. After the problem is built and a tiny warm-up solve has
  loaded everything lazily loaded, the kernel's high-water mark is reset
  (``/proc/self/clear_refs``), so ``VmHWM`` afterwards is the peak of the measured
  solve alone; we report it minus the RSS just before (``extra_mb``). Where the reset
  is not available, ``ru_maxrss`` is used and ``reset`` says so. Run it with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (``test_memory.py`` does): with glibc's adaptive
  threshold, freed tensor buffers stay resident and the numbers depend on the warm-up.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the solve.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

from sinkhorn_ot import sinkhorn

from .cases import grid_case


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def probe(shape, iters: int, grad: str, method: str, backend: str, device: str) -> dict:
    dev = torch.device(device)
    case = grid_case(*shape, device=dev)
    C = case.C.clone().requires_grad_(True)

    def solve(n):
        res = sinkhorn(
            C,
            case.a,
            case.b,
            eps=case.eps,
            method=method,
            grad=grad,
            backend=backend,
            max_iter=n,
            tol=None,
        )
        res.value.sum().backward()

    solve(2)  # warm-up: lazy imports, extension loading, thread pools
    C.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        solve(iters)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {
            "kind": "cuda_max_allocated",
            "before_mb": before / 2**20,
            "peak_mb": peak / 2**20,
            "extra_mb": (peak - before) / 2**20,
            "reset": True,
        }
    before_kb = _status_kb("VmRSS") or 0
    reset = _reset_peak_rss()
    solve(iters)
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return {
        "kind": "rss",
        "before_mb": before_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "extra_mb": (peak_kb - before_kb) / 1024,
        "reset": reset,
    }


def probe_points(dim: int, n: int, iters: int, backend: str, what: str) -> dict:
    """Peak RSS growth of a point-cloud solve (CPU, forward only, ``grad="none"``).

    ``what``: ``"call"`` (the whole ``sinkhorn(PointCloud(x, y), backend=...)``,
    including the result built through the lazy plan), ``"loop"`` (only the loop that
    call runs: ``ops.solve_points`` for native, ``_loop.solve`` for torch) or
    ``"dense"`` (``sinkhorn(C, backend="native")`` on the stored cost, built inside the
    measured region: the contrast of a solver whose memory grows with N M).
    """
    from sinkhorn_ot import PointCloud, sqeuclidean

    from .point_clouds import OursNative, OursTorch, pc_case

    case = pc_case(dim, n)
    small = pc_case(dim, 64)
    loop = {"native": OursNative, "torch": OursTorch}[backend]()

    def solve(c, k):
        if what == "loop":
            loop.prepare(c, (k,))
            loop.run(c, k)
            return
        C = PointCloud(c.x, c.y) if what == "call" else sqeuclidean(c.x, c.y)
        sinkhorn(C, c.a, c.b, eps=c.eps, backend=backend, grad="none", tol=None, max_iter=k)

    solve(small, 2)  # warm-up: lazy imports, extension loading, thread pools
    before_kb = _status_kb("VmRSS") or 0
    reset = _reset_peak_rss()
    solve(case, iters)
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "kind": "rss",
        "before_mb": before_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "extra_mb": (peak_kb - before_kb) / 1024,
        "reset": reset,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, metavar=("B", "N", "M"))
    p.add_argument("--points", type=int, nargs=2, metavar=("D", "N"), help="point clouds")
    p.add_argument("--what", default="call", choices=("call", "loop", "dense"))
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--grad", default="none")
    p.add_argument("--method", default="log")
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.points:
        out = probe_points(*args.points, args.iters, args.backend, args.what)
        print(json.dumps(out))
        return 0
    out = probe(tuple(args.shape), args.iters, args.grad, args.method, args.backend, args.device)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
