"""GPU benchmark grid of the CUDA backend (run by ``benchmarks/gpu_check.sh``).

Measures, in one process on one GPU, the numbers the CUDA issue sets targets for:

1. ``copy``: device-to-device copy bandwidth (bytes read + written per second).
2. ``large``: B=8, N=M=4096, float32: time per iteration of the native op (the difference
   of two iteration counts, so setup is excluded), against the memory roofline
   ``2 B N M 4 bytes / copy bandwidth`` (C read once by the row pass and once by the
   column pass); target ratio <= 1.5. Per-kernel times come from the profiler.
3. ``small``: B=4096 N=M=32 and B=512 N=M=128, float32, 100 iterations (``tol=None``),
   end to end through the public API: ``sinkhorn(backend="native")`` against POT's
   ``ot.solve_batch(method="log_sinkhorn", tol=0)`` (>= 10x) and our torch backend
   (>= 5x); plus the same to tolerance 1e-5 (POT's tol converted as in benchmarks/peers.py).
4. ``grid``: time per iteration, native vs torch backend, over the CUDA grid.
5. ``points``: the point-cloud op ``solve_points`` (cost computed on the fly, nothing of
   size N M stored), float32, sqeuclidean, B=1, N = M up to 100 000, D in {3, 64}: time
   per iteration and pair evaluations per second (``B N M iterations 2 / time``: each
   iteration evaluates every pair twice, once per half-step); where the dense cost fits,
   also the dense op on the materialised cost.

Inputs follow benchmarks/cases.py (squared Euclidean cost between uniform points in the
unit cube, uniform weights, eps = 0.05 * median cost), generated here on the CPU from
fixed seeds so the script has no dependency beyond sinkhorn_ot (and POT, optional).

Usage: ``python benchmarks/gpu/bench.py --out DIR [--quick]``; writes ``DIR/bench.json``
and ``DIR/bench.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from sinkhorn_ot import native, sinkhorn
from sinkhorn_ot._loop import solve_potentials as torch_solve

LARGE = (8, 4096, 4096)
SMALL = [(4096, 32, 32), (512, 128, 128)]
GRID = [
    (4096, 32, 32),
    (1024, 128, 128),
    (256, 256, 256),
    (64, 512, 512),
    (8, 2048, 2048),
    (1, 8192, 8192),
]
# (B, N, M, D) of the point-cloud section; dense comparison while N M <= POINTS_DENSE_MAX.
POINTS = [
    (1, 10_000, 10_000, 3),
    (1, 10_000, 10_000, 64),
    (1, 100_000, 100_000, 3),
    (1, 100_000, 100_000, 64),
]
POINTS_DENSE_MAX = 10_000 * 10_000
SMALL_ITERS = 100
TARGETS = {"large_roofline_ratio": 1.5, "speedup_vs_pot": 10.0, "speedup_vs_torch": 5.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def cuda_time(fn, *, warmup: int = 1, reps: int = 5) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read plus written per second by a device-to-device copy."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), warmup=2, reps=10)
    return 2 * nbytes / t


def grid_case(B, N, M, dtype=torch.float32, seed=0):
    """As benchmarks/cases.py: sqeuclidean between uniform points in [0,1]^3, eps from
    the median cost."""
    g = torch.Generator().manual_seed(seed + 1000 * B + N + M)
    x = torch.rand(B, N, 3, generator=g, dtype=torch.float32).cuda()
    y = torch.rand(B, M, 3, generator=g, dtype=torch.float32).cuda()
    C = ((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).sum(-1).to(dtype)  # (B, N, M)
    sample = C.reshape(-1)[:: max(1, C.numel() // (1 << 20))]
    eps = 0.05 * float(sample.double().median())
    a = torch.full((B, N), 1.0 / N, dtype=dtype, device="cuda")
    b = torch.full((B, M), 1.0 / M, dtype=dtype, device="cuda")
    return C, a, b, eps


def op_args(C, a, b, eps):
    e = torch.full((C.shape[0],), eps, dtype=C.dtype, device=C.device)
    f0 = -e.unsqueeze(-1) * a.log()
    return C, a, b, e, f0


def native_op(C, a, b, e, f0, iters, tol=None, method="log"):
    table = e.unsqueeze(-1).contiguous()  # no annealing: S = 1
    return torch.ops.sinkhorn_ot.solve(C, a, b, f0, table, iters, tol, method)


def points_case(B, N, M, D, seed=0):
    """Uniform points in [0, 1]^D, sqeuclidean scaled by 1 / D, eps = 0.05 (about 0.05 x
    the median cost 1/6), uniform weights; float32 on the GPU."""
    g = torch.Generator().manual_seed(seed + N + D)
    x = torch.rand(B, N, D, generator=g).cuda()
    y = torch.rand(B, M, D, generator=g).cuda()
    a = torch.full((B, N), 1.0 / N, device="cuda")
    b = torch.full((B, M), 1.0 / M, device="cuda")
    e = torch.full((B,), 0.05 / 6, device="cuda")
    return x, y, a, b, e, -e.unsqueeze(-1) * a.log()


def points_op(x, y, a, b, e, f0, iters, cost="sqeuclidean", scale=None):
    scale = 1.0 / x.shape[-1] if scale is None else scale
    table = e.unsqueeze(-1).contiguous()
    return torch.ops.sinkhorn_ot.solve_points(
        x, y, a, b, f0, table, iters, None, "log", cost, scale
    )


def per_iteration(run, k1: int, k2: int, reps: int = 5) -> float:
    """Seconds per iteration: (t(k2) - t(k1)) / (k2 - k1), each the median of ``reps``."""
    t1 = cuda_time(lambda: run(k1), reps=reps)
    t2 = cuda_time(lambda: run(k2), reps=reps)
    return max(t2 - t1, 1e-9) / (k2 - k1)


def _pow2_ceil(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def _pow2_floor(x: int) -> int:
    p = 1
    while 2 * p <= x:
        p *= 2
    return p


def which_path(N, M, dtype) -> str:
    """The kernel path the op takes for (N, M): mirrors plan_small() in
    csrc/cuda/small_solver.cu (C with an odd row stride, plus vectors, must fit in the
    shared memory of one block)."""
    forced = os.environ.get("SINKHORN_OT_CUDA_PATH", "auto")
    if forced in ("small", "large"):
        return forced
    itemsize = torch.empty((), dtype=dtype).element_size()
    prop = torch.cuda.get_device_properties(0)
    smem = getattr(prop, "shared_memory_per_block_optin", 227 * 1024)
    warps = min(16, _pow2_floor(max(1, N * M // 1024)))
    part = 0
    for n_outer in (N, M):
        split = warps // min(warps, _pow2_ceil((n_outer + 31) // 32))
        if split > 1:
            part = max(part, split * n_outer)
    words = N * (M | 1) + 4 * N + 2 * M + max(N, M) + 2 * part
    fits = N * M <= 1 << 24 and (128 + itemsize * words + 15) // 16 * 16 <= smem
    return "small" if fits else "large"


def kernel_times(run) -> dict[str, float]:
    """Average device time (s) per launch of each of our kernels, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        name = evt.key
        for short in (
            "row_kernel",
            "col_kernel",
            "finalize_kernel",
            "init_kernel",
            "small_solve_kernel",
        ):
            if short in name and evt.count:
                total = getattr(evt, "device_time_total", None)
                if total is None:
                    total = getattr(evt, "cuda_time_total", 0.0)
                out[short] = out.get(short, 0.0) + total / 1e6 / evt.count
    return out


def bench_large(results, bw, quick):
    B, N, M = LARGE
    C, a, b, eps = grid_case(B, N, M)
    args = op_args(C, a, b, eps)
    t_native = per_iteration(lambda k: native_op(*args, k), 5, 15 if quick else 30)
    roof = 2 * B * N * M * 4 / bw
    kt = {}
    try:
        kt = kernel_times(lambda: native_op(*args, 10))
    except Exception as exc:  # the profiler is a nicety
        log(f"  (profiler unavailable: {exc})")
    row = {
        "shape": [B, N, M],
        "native_s_per_iter": t_native,
        "roofline_s_per_iter": roof,
        "ratio_to_roofline": t_native / roof,
        "target": TARGETS["large_roofline_ratio"],
        "kernels_s": kt,
    }
    for k in ("row_kernel", "col_kernel"):
        if k in kt:
            row[f"{k}_GBps"] = B * N * M * 4 / kt[k] / 1e9
    try:
        t_torch = per_iteration(
            lambda k: torch_solve(*args, max_iter=k, tol=None, method="log"), 2, 6, reps=3
        )
        row["torch_s_per_iter"] = t_torch
        row["speedup_vs_torch"] = t_torch / t_native
    except torch.cuda.OutOfMemoryError:
        row["torch_s_per_iter"] = None
    results["large"] = row
    log(
        f"large {B}x{N}x{M}: native {t_native * 1e3:.3f} ms/iter, roofline {roof * 1e3:.3f} ms "
        f"-> ratio {t_native / roof:.2f} (target <= 1.5); kernels "
        + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in kt.items())
    )


def small_case(ot, B, N, M, quick):
    """One small-batch row: fixed iterations end to end, then to tolerance 1e-5."""
    C, a, b, eps = grid_case(B, N, M)
    kw = {"eps": eps, "grad": "none"}
    fixed = {"tol": None, "max_iter": SMALL_ITERS}
    reps = 3 if quick else 5
    t_nat = cuda_time(lambda: sinkhorn(C, a, b, backend="native", **kw, **fixed), reps=reps)
    t_tor = cuda_time(lambda: sinkhorn(C, a, b, backend="torch", **kw, **fixed), reps=reps)
    args = op_args(C, a, b, eps)
    t_op = cuda_time(lambda: native_op(*args, SMALL_ITERS), reps=reps)
    row = {
        "shape": [B, N, M],
        "iters": SMALL_ITERS,
        "path": which_path(N, M, torch.float32),
        "native_s": t_nat,
        "native_op_s": t_op,
        "torch_s": t_tor,
        "speedup_vs_torch": t_tor / t_nat,
    }
    if ot is not None:
        t_pot = cuda_time(
            lambda: ot.solve_batch(
                C, eps, a, b, max_iter=SMALL_ITERS, tol=0.0, method="log_sinkhorn", grad="detach"
            ),
            reps=reps,
        )
        row["pot_s"] = t_pot
        row["speedup_vs_pot"] = t_pot / t_nat
    # To tolerance (each its own stopping rule; POT's converted as in benchmarks/peers.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt = {"tol": 1e-5, "max_iter": 5000}
        res = sinkhorn(C, a, b, backend="native", **kw, **tt)
        row["to_tol_native_iters_max"] = int(res.n_iter.max())
        row["to_tol_native_s"] = cuda_time(
            lambda: sinkhorn(C, a, b, backend="native", **kw, **tt), reps=3
        )
        row["to_tol_torch_s"] = cuda_time(
            lambda: sinkhorn(C, a, b, backend="torch", **kw, **tt), warmup=0, reps=1
        )
        if ot is not None:
            pot_tol = 1e-5 / math.sqrt(N)
            row["to_tol_pot_s"] = cuda_time(
                lambda: ot.solve_batch(
                    C,
                    eps,
                    a,
                    b,
                    max_iter=5000,
                    tol=pot_tol,
                    method="log_sinkhorn",
                    grad="detach",
                ),
                warmup=0,
                reps=1,
            )
    log(
        f"small {B}x{N}x{M} ({row['path']}), {SMALL_ITERS} iters: native {t_nat * 1e3:.2f} ms "
        f"(op {t_op * 1e3:.2f} ms), torch {t_tor * 1e3:.2f} ms -> x{t_tor / t_nat:.1f}"
        + (f", POT {row['pot_s'] * 1e3:.2f} ms -> x{row['speedup_vs_pot']:.1f}" if ot else "")
    )
    return row


def bench_small(results, quick):
    try:
        import ot
    except ImportError:
        ot = None
        log("POT is not installed: no POT comparison")
    results["small"] = [small_case(ot, B, N, M, quick) for B, N, M in SMALL]


def grid_row(B, N, M, quick):
    C, a, b, eps = grid_case(B, N, M)
    args = op_args(C, a, b, eps)
    t_nat = per_iteration(lambda k: native_op(*args, k), 2, 10 if quick else 20, reps=3)
    try:
        t_tor = per_iteration(
            lambda k: torch_solve(*args, max_iter=k, tol=None, method="log"), 2, 6, reps=3
        )
    except torch.cuda.OutOfMemoryError:
        t_tor = float("nan")
    row = {
        "shape": [B, N, M],
        "path": which_path(N, M, torch.float32),
        "native_s_per_iter": t_nat,
        "torch_s_per_iter": t_tor,
        "speedup_vs_torch": t_tor / t_nat,
        "native_GBps_effective": 2 * B * N * M * 4 / t_nat / 1e9,
    }
    log(
        f"grid {B}x{N}x{M} ({row['path']}): native {t_nat * 1e6:.1f} us/iter, "
        f"torch {t_tor * 1e6:.1f} us/iter -> x{t_tor / t_nat:.1f}"
    )
    return row


def bench_grid(results, quick):
    rows = []
    for B, N, M in GRID:
        rows.append(grid_row(B, N, M, quick))
        torch.cuda.empty_cache()
    results["grid"] = rows


def points_row(B, N, M, D, quick):
    x, y, a, b, e, f0 = points_case(B, N, M, D)
    big = N * M > POINTS_DENSE_MAX
    k1, k2, reps = (1, 3, 1) if big else (2, 6 if quick else 12, 3)
    t = per_iteration(lambda k: points_op(x, y, a, b, e, f0, k), k1, k2, reps=reps)
    row = {
        "shape": [B, N, M, D],
        "points_s_per_iter": t,
        "pair_evals_per_s": 2 * B * N * M / t,
    }
    if not big:
        try:
            C = ((x.unsqueeze(2) - y.unsqueeze(1)) ** 2).sum(-1) / D
            t_dense = per_iteration(lambda k: native_op(C, a, b, e, f0, k), k1, k2, reps=reps)
            row["dense_s_per_iter"] = t_dense
            del C
        except torch.cuda.OutOfMemoryError:
            row["dense_s_per_iter"] = None
    log(
        f"points {B}x{N}x{M}xD{D}: {t * 1e3:.2f} ms/iter, "
        f"{row['pair_evals_per_s'] / 1e9:.1f} G pair-evals/s"
        + (
            f", dense op {row['dense_s_per_iter'] * 1e3:.2f} ms/iter"
            if row.get("dense_s_per_iter")
            else ""
        )
    )
    return row


def bench_points(results, quick):
    rows = []
    for B, N, M, D in POINTS:
        rows.append(points_row(B, N, M, D, quick))
        results["points"] = rows  # partial results survive a timeout
        torch.cuda.empty_cache()


def markdown(results) -> str:
    d = results["device"]
    lines = [
        f"# CUDA backend benchmarks: {d['name']}",
        "",
        f"torch {d['torch']}, CUDA {d['cuda']}, {d['sm_count']} SMs; "
        f"copy bandwidth {results['copy_GBps']:.0f} GB/s (read + write).",
        "",
    ]
    if "large" in results:
        r = results["large"]
        lines += [
            "## Large dense (B=8, N=M=4096, float32)",
            "",
            "| native ms/iter | roofline ms/iter | ratio (target <= 1.5) | torch ms/iter | "
            "row kernel GB/s | col kernel GB/s |",
            "|---|---|---|---|---|---|",
            f"| {r['native_s_per_iter'] * 1e3:.3f} | {r['roofline_s_per_iter'] * 1e3:.3f} | "
            f"{r['ratio_to_roofline']:.2f} | "
            f"{(r.get('torch_s_per_iter') or float('nan')) * 1e3:.3f} | "
            f"{r.get('row_kernel_GBps', float('nan')):.0f} | "
            f"{r.get('col_kernel_GBps', float('nan')):.0f} |",
            "",
        ]
    if "small" in results:
        lines += [
            f"## Small batched, {SMALL_ITERS} iterations, end to end (float32)",
            "",
            "| shape | path | native ms | op ms | torch ms | POT ms | vs torch (>= 5) | "
            "vs POT (>= 10) | to tol 1e-5: native / torch / POT ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["small"]:
            pot = r.get("pot_s")
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['path']} | {r['native_s'] * 1e3:.2f} | "
                f"{r['native_op_s'] * 1e3:.2f} | {r['torch_s'] * 1e3:.2f} | "
                f"{pot * 1e3 if pot else float('nan'):.2f} | {r['speedup_vs_torch']:.1f} | "
                f"{r.get('speedup_vs_pot', float('nan')):.1f} | "
                f"{r['to_tol_native_s'] * 1e3:.2f} / {r['to_tol_torch_s'] * 1e3:.1f} / "
                f"{r.get('to_tol_pot_s', float('nan')) * 1e3:.1f} |"
            )
        lines.append("")
    if "grid" in results:
        lines += [
            "## Grid: time per iteration (float32)",
            "",
            "| shape | path | native us/iter | torch us/iter | speedup | native GB/s (2 passes) |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["grid"]:
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['path']} | "
                f"{r['native_s_per_iter'] * 1e6:.1f} | {r['torch_s_per_iter'] * 1e6:.1f} | "
                f"{r['speedup_vs_torch']:.1f} | {r['native_GBps_effective']:.0f} |"
            )
        lines.append("")
    if "points" in results:
        lines += [
            "## Point clouds: solve_points (sqeuclidean, float32, cost on the fly)",
            "",
            "| B x N x M x D | ms/iter | G pair-evals/s | dense op ms/iter |",
            "|---|---|---|---|",
        ]
        for r in results["points"]:
            dense = r.get("dense_s_per_iter")
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['points_s_per_iter'] * 1e3:.2f} | "
                f"{r['pair_evals_per_s'] / 1e9:.1f} | "
                f"{dense * 1e3 if dense else float('nan'):.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", nargs="*", default=["large", "small", "grid", "points"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 2
    ok, reason = native.availability(torch.device("cuda"), torch.float32)
    if not ok:
        log(f"native-cuda unavailable: {reason}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    prop = torch.cuda.get_device_properties(0)
    results = {
        "device": {
            "name": prop.name,
            "sm_count": prop.multi_processor_count,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
    }
    t0 = time.time()
    bw = copy_bandwidth()
    results["copy_GBps"] = bw / 1e9
    log(f"{prop.name}: copy bandwidth {bw / 1e9:.0f} GB/s")
    sections = {
        "large": lambda: bench_large(results, bw, args.quick),
        "small": lambda: bench_small(results, args.quick),
        "grid": lambda: bench_grid(results, args.quick),
        "points": lambda: bench_points(results, args.quick),
    }
    for name in args.only:
        try:
            sections[name]()
        except Exception as exc:  # keep going: one failing section must not hide the rest
            results.setdefault("errors", {})[name] = repr(exc)
            log(f"{name}: FAILED {exc!r}")
        (args.out / "bench.json").write_text(json.dumps(results, indent=1))
    results["elapsed_s"] = time.time() - t0
    (args.out / "bench.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (args.out / "bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
