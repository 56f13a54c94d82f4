"""Point clouds on CPU: agreement at N = 500, per-iteration time, peak memory.

See :mod:`benchmarks.point_clouds` for the problems and the per-iteration method, and
the point-cloud part of :mod:`benchmarks.peers` for POT / GeomLoss / OTT-JAX. Results
go to ``<out>/cpu-point-clouds.md`` (``report.write_point_clouds``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from . import point_clouds as pc
from .peers import point_cloud_peers
from .registry import get as registry
from .suite import detect
from .test_memory import PROBE_ENV, REPO

#: ``(what, backend, D, N)`` of the memory probes: the native loop at every size (flat
#: in N M?), the torch loop (16 MiB blocks), one whole ``sinkhorn()`` call (the result is
#: built through the lazy plan) and the dense native solve for contrast. The call and
#: dense probes run at N = 5000 (a whole call costs seconds per 10^8 pairs on the torch
#: side; the dense cost is 100 MB there).
MEMORY_PROBES = [
    ("loop", "native", 3, 1000),
    ("loop", "native", 3, 10000),
    ("loop", "native", 3, 50000),
    ("loop", "torch", 3, 10000),
    ("call", "native", 3, 5000),
    ("dense", "native", 3, 5000),
]

_IMPLS: list | None = None
#: measured per-iteration time of (D, key) at the last size: the skip estimate's base
_LAST: dict[tuple[int, str], tuple[int, float]] = {}


def _impls(bench):
    global _IMPLS
    if _IMPLS is None:
        caps = detect(str(bench["device"]))
        peers, missing = point_cloud_peers()
        _IMPLS = pc.ours_pc_impls(caps.backends) + peers
        registry().meta["pc_missing"] = missing
    return _IMPLS


@pytest.fixture
def cpu_only(bench):
    if bench["device"].type != "cpu":
        pytest.skip("the point-cloud section is CPU-only")


@pytest.mark.parametrize("dim", pc.PC_DIMS)
def test_pc_agreement(dim, bench, cpu_only):
    """Every implementation's converged plan and potentials against ours[torch]."""
    case = pc.pc_case(dim, pc.PC_AGREE_N)
    impls = _impls(bench)
    ref_impl = next(i for i in impls if i.key == "ours-torch")
    f_ref, g_ref, P_ref = ref_impl.converged(case, pc.PC_AGREE_TOL)
    bad = []
    for impl in impls:
        why = impl.unavailable(case)
        if why is not None:
            registry().add("pc-agreement", case.name, impl.label, math.nan, key=impl.key, why=why)
            continue
        f, g, P = impl.converged(case, pc.PC_AGREE_TOL)
        P, R = P.double(), P_ref.double()
        diff = float((P - R).abs().max() / R.abs().max())
        pot = pc.potential_difference(case, f, g, f_ref, g_ref)
        registry().add(
            "pc-agreement", case.name, impl.label, diff, key=impl.key, potentials=pot, dim=dim
        )
        if not diff <= pc.PC_PLAN_RTOL:
            bad.append((impl.label, diff))
    if bad:
        pytest.exit(
            f"point-cloud agreement failed on {case.name}: {bad} (limit {pc.PC_PLAN_RTOL:g}); "
            "not timing implementations that compute something else.",
            returncode=3,
        )


@pytest.mark.parametrize("n", pc.PC_SIZES)
@pytest.mark.parametrize("dim", pc.PC_DIMS)
def test_pc_per_iter(dim, n, bench, cpu_only):
    case = pc.pc_case(dim, n)
    rounds = pc.PC_ITERS[n][2]
    run = []
    for impl in _impls(bench):
        why = impl.unavailable(case)
        if why is None and n >= pc.SKIP_ESTIMATE_FROM_N and (dim, impl.key) in _LAST:
            n_prev, t_prev = _LAST[(dim, impl.key)]
            t0, t1 = pc.iteration_counts(impl, n)
            est = t_prev * (n / n_prev) ** 2
            if est * (t0 + t1) * rounds > pc.ROW_BUDGET_S:
                why = (
                    f"not run: estimated {est:.3g} s/iteration from N={n_prev} "
                    f"({(t0 + t1) * rounds} iterations > {pc.ROW_BUDGET_S:g} s budget)"
                )
        if why is None and (dim, impl.key) not in _LAST and n > min(pc.PC_SIZES):
            why = "not run: not measured at the smaller size"
        if why is not None:
            registry().add(
                "pc-forward",
                case.name,
                impl.label,
                math.nan,
                key=impl.key,
                dim=dim,
                n=n,
                why=why,
                ours=impl.ours,
            )
            continue
        impl.prepare(case, pc.iteration_counts(impl, n))
        run.append(impl)
    extra = {}
    native = next((i for i in run if i.key == "ours-native"), None)
    if native is not None and n <= pc.DENSE_MAX_N:
        extra["call"] = lambda: native.full_call(case, 0)
    try:
        results, extra_t = pc.measure_interleaved(case, run, rounds, extra)
    finally:
        for impl in run:
            impl.release()
    for impl in run:
        r = results[impl.key]
        # the skip estimate at the next size (a noisy non-positive difference falls back
        # to the whole T-iteration time per iteration, an upper bound)
        _LAST[(dim, impl.key)] = (n, r.per_iter if r.per_iter > 0 else r.t_hi / max(1, r.n_hi))
        registry().add(
            "pc-forward",
            case.name,
            impl.label,
            r.per_iter,
            key=impl.key,
            dim=dim,
            n=n,
            ours=impl.ours,
            t_hi=r.t_hi,
            t_lo=r.t_lo,
            n_hi=r.n_hi,
            n_lo=r.n_lo,
            rounds=r.rounds,
            work=case.work,
            eps=case.eps,
        )
    if "call" in extra_t:
        loop0 = results["ours-native"].t_lo  # the loop alone at T0 = 0 iterations
        registry().add(
            "pc-overhead",
            case.name,
            "ours[native]",
            extra_t["call"] - loop0,
            dim=dim,
            n=n,
            call=extra_t["call"],
            loop=loop0,
        )


@pytest.mark.parametrize("probe", MEMORY_PROBES, ids=lambda p: "-".join(map(str, p)))
def test_pc_memory(probe, bench, cpu_only):
    what, backend, dim, n = probe
    caps = detect(str(bench["device"]))
    if backend not in caps.backends:
        pytest.skip(f"backend {backend} not available")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory_probe",
        "--points",
        str(dim),
        str(n),
        "--what",
        what,
        "--backend",
        backend,
        "--iters",
        "1",
        "--threads",
        str(bench["threads"]),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=PROBE_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    registry().add(
        "pc-memory",
        pc.pc_name(dim, n),
        f"ours[{backend}]",
        out["extra_mb"],
        what=what,
        backend=backend,
        dim=dim,
        n=n,
        **out,
    )
