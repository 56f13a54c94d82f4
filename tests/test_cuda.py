"""CUDA backend: parity on the GPU, and what can be checked without one.

* On a machine with an NVIDIA GPU (tests marked ``cuda``): the native CUDA ops against the
  torch backend on the same GPU (``solve`` on both kernel paths: ``small``, one launch per
  batch with C in shared memory, and ``large``, streaming row/column passes; and
  ``solve_points``, the cost computed on the fly from the point clouds, against the torch
  loop on the dense cost of the same points), against POT, the public ``sinkhorn`` with
  every gradient mode that exists, ``torch.compile`` and ``opcheck``. They skip cleanly
  without a GPU.
* Anywhere with ``nvcc`` and a CUDA build of torch: the CUDA extension compiles and links,
  and ``info`` says ``native-cuda: compiled, no device`` when there is no GPU.
* Anywhere with a C++20 compiler: the CUDA kernel files themselves, compiled as C++
  against a CPU emulation of the CUDA runtime (``tests/cuda_emulation``, test-only code,
  not shipped), reproduce the torch loop (same potentials, same ``n_iter``) on both dense
  paths and on the point-cloud kernels. This is what tests the kernels' indexing,
  barriers and stopping logic on a CPU-only CI.

The oracle is :func:`sinkhorn_ot._loop.solve_potentials`. Tolerances: potentials 1e-10
relative in float64 and 1e-4 in float32 (GPU exp2/log2 and reduction orders differ from
torch's by a few ulps per step); ``n_iter`` equal in float64, equal up to one iteration
in float32 (a violation within rounding of ``tol`` may cross it one iteration apart).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from sinkhorn_ot import KernelUnderflowError, PointCloud, costs, native, sinkhorn
from sinkhorn_ot._loop import _raise_non_finite, eps_table
from sinkhorn_ot._loop import solve_potentials as torch_solve
from sinkhorn_ot.testing import assert_close_rel, default_init, random_problem

HAS_GPU = torch.cuda.is_available()
INF = math.inf
CSRC = Path(native.__file__).resolve().parent / "csrc"
CUDA_DIR = CSRC / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"
COSTS = {"sqeuclidean": costs.sqeuclidean, "euclidean": costs.euclidean, "cosine": costs.cosine}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
gpu = [pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")]


# --------------------------------------------------------------------------------------
# Helpers


def problem(B, N, M, dtype, device="cpu", seed=0, pad=False, eps=0.1):
    """A random batch with per-problem eps (so problems stop at different iterations)."""
    C, a, b = random_problem(B, N, M, dtype=torch.float64, seed=seed)
    if pad:  # zero weights: padding rows and columns
        a[:, -2:] = 0
        b[:, :1] = 0
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    e = eps * (1 + 0.5 * torch.arange(B, dtype=torch.float64) / B)
    kw = {"dtype": dtype, "device": device}
    return C.to(**kw), a.to(**kw), b.to(**kw), e.to(**kw)


def table_of(C, eps, eps_scaling):
    """The eps table of the torch loop's schedule, in the dtype of C."""
    scale = C.detach().abs().amax((1, 2)) if C.numel() else eps
    return eps_table(eps, scale, eps_scaling).to(C.dtype).contiguous()


def check_finite(method, f, g, err):
    """What the Python wrapper does with the op's outputs."""
    if not bool(torch.isfinite(err).all() & torch.isfinite(f).all() & torch.isfinite(g).all()):
        _raise_non_finite(method)


def points_problem(B, N, M, D, dtype, device="cpu", seed=0, pad=False, eps=0.2):
    """Random point clouds (centred, so that the cosine cost is not trivial), random
    weights and per-problem eps; padding: the last two rows and the first column."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    y = torch.randn(B, M, D, generator=gen, dtype=torch.float64) + 0.25
    a = torch.rand(B, N, generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(B, M, generator=gen, dtype=torch.float64) + 0.5
    if pad:
        a[:, -2:] = 0
        b[:, :1] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    e = eps * (1 + 0.5 * torch.arange(B, dtype=torch.float64) / B)
    kw = {"dtype": dtype, "device": device}
    return x.to(**kw), y.to(**kw), a.to(**kw), b.to(**kw), e.to(**kw)


def unit_scale(cost, D):
    """A cost_scale that keeps the costs of order 1 whatever D."""
    return {"sqeuclidean": 1.0 / D, "euclidean": 1.0 / math.sqrt(D), "cosine": 1.0}[cost]


def dense_cost(x, y, cost, cost_scale):
    """The torch reference cost of the points: built in float64 (so that a float32 kernel
    and its reference differ by roundings of C only), in the dtype of the points."""
    return (COSTS[cost](x.double(), y.double()) * cost_scale).to(x.dtype)


def assert_parity(ref, out, dtype):
    (f_r, g_r, it_r, err_r), (f_n, g_n, it_n, err_n) = ref, out
    assert f_n.dtype == dtype and g_n.dtype == dtype
    assert it_n.dtype == torch.int64 and err_n.dtype == torch.float64
    it_r, it_n = it_r.cpu(), it_n.cpu()
    if dtype == torch.float64:
        assert torch.equal(it_n, it_r), f"n_iter: cuda {it_n.tolist()} vs torch {it_r.tolist()}"
        assert_close_rel(f_n, f_r, RTOL[dtype], "f")
        assert_close_rel(g_n, g_r, RTOL[dtype], "g")
        # err is a small difference of potentials: relative agreement is looser.
        assert torch.allclose(err_n.cpu(), err_r.cpu(), rtol=1e-5, atol=1e-14), (err_n, err_r)
        return
    diff = (it_n - it_r).abs()
    assert int(diff.max()) <= 1, f"n_iter: cuda {it_n.tolist()} vs torch {it_r.tolist()}"
    same = diff == 0
    if bool(same.any()):  # potentials of problems that ran the same number of iterations
        idx = same.nonzero().flatten()
        assert_close_rel(f_n.cpu()[idx], f_r.cpu()[idx], RTOL[dtype], "f")
        assert_close_rel(g_n.cpu()[idx], g_r.cpu()[idx], RTOL[dtype], "g")
        assert torch.allclose(err_n.cpu()[idx], err_r.cpu()[idx], rtol=0.05, atol=1e-6)


# --------------------------------------------------------------------------------------
# Without a GPU: the extension builds, and the kernels run under emulation.


def _nvcc_missing() -> str | None:
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc was not found"
    if not native.enabled():
        return f"native backends disabled by {native.ENV_SWITCH}=0"
    return None


def test_cuda_extension_compiles_and_links():
    """CI without a GPU must still compile and link the CUDA extension (sm_80, sm_90)."""
    missing = _nvcc_missing()
    if missing is not None:
        pytest.skip(f"the CUDA extension cannot be built here: {missing}")
    errors = native.build(cuda=True, verbose=False)
    assert errors["native-cuda"] is None, f"native-cuda build failed: {errors['native-cuda']}"
    expected = "native-cuda: ok" if HAS_GPU else "native-cuda: compiled, no device"
    assert expected in native.info_lines()


_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
_SMEM = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+(\w+)\[\];")


def emulation_source(text: str) -> str:
    """A .cu file as C++ for the emulation: launches become ``emu::launch`` calls and the
    dynamic shared memory a pointer from the emulator."""
    text = _SMEM.sub(r"unsigned char* \1 = emu::dynamic_smem();", text)
    return _LAUNCH.sub(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)});", text)


@pytest.fixture(scope="module")
def emulated():
    """``torch.ops.sinkhorn_ot_emu``: the CUDA kernel files run on the CPU."""
    import hashlib

    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    if not EMU_DIR.is_dir():
        pytest.skip("the CUDA emulation sources are missing (source checkouts only)")
    # One build folder per checkout (worktrees side by side must not share one).
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or tempfile.gettempdir())
    tag = hashlib.sha1(str(CUDA_DIR).encode()).hexdigest()[:8]
    build = root / f"sinkhorn_ot_cuda_emulation_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        dst = build / f"{cu.stem}_emu.cpp"
        text = emulation_source(cu.read_text())
        if not dst.exists() or dst.read_text() != text:  # keep mtimes: ninja rebuilds less
            dst.write_text(text)
        sources.append(str(dst))
    sources.append(str(EMU_DIR / "emu_glue.cpp"))
    cpp_extension.load(
        name=f"sinkhorn_ot_cuda_emu_{tag}",
        sources=sources,
        extra_include_paths=[str(EMU_DIR), str(CUDA_DIR), str(CSRC)],
        extra_cflags=["-std=c++20", "-O2"],
        build_directory=str(build),
        with_cuda=False,
        is_python_module=False,
    )
    return torch.ops.sinkhorn_ot_emu


# A fake device: 4 multiprocessors, 100 KiB shared memory per block.
EMU_SMS, EMU_SMEM = 4, 100 * 1024


def emu_solve(emu, C, a, b, eps, f0, *, max_iter, tol, method, eps_scaling=None, path):
    table = table_of(C, eps, eps_scaling)
    return emu.solve(C, a, b, f0, table, int(max_iter), tol, method, path, EMU_SMS, EMU_SMEM)


def emu_points(
    emu,
    x,
    y,
    a,
    b,
    eps,
    f0,
    *,
    cost,
    cost_scale,
    max_iter,
    tol,
    method,
    eps_scaling=None,
    sm_count=EMU_SMS,
):
    C = dense_cost(x, y, cost, cost_scale)  # the table's cost scale, as the wrapper's
    table = table_of(C, eps, eps_scaling)
    return emu.solve_points(
        x, y, a, b, f0, table, int(max_iter), tol, method, cost, float(cost_scale), sm_count
    )


# (B, N, M): warp per problem (several per block, more rows than lanes), block per problem
# with split inner loops, odd sizes; the large path with 16-byte loads (M % 4 == 0) and
# without, and with more than one row chunk per column strip (N >= 128 on 4 SMs).
EMU_SMALL = [(3, 7, 5), (2, 33, 40), (2, 64, 64), (1, 130, 70)]
EMU_LARGE = [(2, 20, 12), (2, 17, 9), (1, 130, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize(
    ("path", "shape"),
    [("small", s) for s in EMU_SMALL] + [("large", s) for s in EMU_LARGE],
    ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)),
)
def test_emulated_kernels_match_torch(emulated, path, shape, method, dtype):
    B, N, M = shape
    # The large path is slow under emulation (OS threads and barriers per CUDA thread and
    # launch): a larger eps converges in about ten iterations (problems still stop apart).
    eps = 1.0 if path == "large" else 0.1
    C, a, b, eps = problem(B, N, M, dtype, seed=N + M, pad=N > 8, eps=eps)
    f0 = default_init(a, eps)
    kw = {"max_iter": 60, "tol": TOL[dtype], "method": method}
    ref = torch_solve(C, a, b, eps, f0, **kw)
    out = emu_solve(emulated, C, a, b, eps, f0, path=path, **kw)
    assert_parity(ref, out, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["small", "large"])
def test_emulated_annealing_and_fixed_iterations(emulated, path):
    C, a, b, eps = problem(2, 19, 13, torch.float64, seed=3, eps=0.2)
    f0 = default_init(a, eps) + 0.1  # a warm start
    for kw in [
        {"max_iter": 25, "tol": 1e-9, "method": "log", "eps_scaling": 0.6},
        {"max_iter": 7, "tol": None, "method": "kernel", "eps_scaling": 0.5},
        {"max_iter": 0, "tol": 1e-9, "method": "log"},
    ]:
        ref = torch_solve(C, a, b, eps, f0, **kw)
        out = emu_solve(emulated, C, a, b, eps, f0, path=path, **kw)
        assert_parity(ref, out, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["small", "large"])
def test_emulated_kernel_underflow_returns_non_finite(emulated, path):
    """The op must not crash on exp(-C/eps) underflow; the wrapper raises on what it returns."""
    C, a, b, eps = problem(2, 6, 9, torch.float32, eps=1e-3)
    _, g, _, err = emu_solve(
        emulated,
        100 * C,
        a,
        b,
        eps,
        default_init(a, eps),
        max_iter=20,
        tol=1e-5,
        method="kernel",
        path=path,
    )
    assert not (bool(torch.isfinite(err).all()) and bool(torch.isfinite(g).all()))


@pytest.mark.slow
def test_path_choice(emulated):
    """On-chip while C (plus a few vectors) fits in one block's shared memory."""
    kb = 100 * 1024
    assert emulated.chosen_path(32, 32, 4, 4, kb) == "small"
    assert emulated.chosen_path(128, 128, 4, 4, kb) == "small"  # 66 KB
    assert emulated.chosen_path(128, 128, 8, 4, kb) == "large"  # 132 KB > 100 KB
    assert emulated.chosen_path(4096, 4096, 4, 4, kb) == "large"
    assert emulated.chosen_path(128, 128, 8, 4, 227 * 1024) == "small"  # H100: 227 KB


# Unbalanced problems: a batch that mixes a fully relaxed, a semi-relaxed (hard rows) and
# a balanced problem, so that the damping of each side and both stopping rules (per
# problem) run in one launch; the oracle is the torch loop with the same relaxation.
def mixed_relaxation(B, dtype):
    inf = math.inf
    rows = [[0.5, 2.0], [inf, 1.0], [inf, inf]]
    return torch.tensor([rows[k % 3] for k in range(B)], dtype=dtype)


def relaxed_reference(C, a, b, eps, f0, rho, stop, **kw):
    from sinkhorn_ot._loop import solve
    from sinkhorn_ot.geometry import DenseCost

    table = table_of(C, eps, kw.pop("eps_scaling", None))
    relaxed = torch.isfinite(rho).any(-1)
    potentials = relaxed | (stop == "potentials")
    return solve(DenseCost(C), a, b, f0, table, rho=rho, potentials=potentials, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["marginals", "potentials"])
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize(("path", "shape"), [("small", (3, 33, 40)), ("large", (3, 17, 9))])
def test_emulated_unbalanced_match_torch(emulated, path, shape, method, stop):
    B, N, M = shape
    C, a, b, eps = problem(B, N, M, torch.float64, seed=N, pad=True, eps=0.3)
    b = b * 2.5  # unequal masses: only the balanced problem is rescaled back
    b[2] = b[2] / 2.5
    rho = mixed_relaxation(B, torch.float64)
    f0 = default_init(a, eps)
    kw = {"max_iter": 60, "tol": 1e-9, "method": method}
    ref = relaxed_reference(C, a, b, eps, f0, rho, stop, **kw)
    table = table_of(C, eps, None)
    out = emulated.solve(C, a, b, f0, table, 60, 1e-9, method, path, EMU_SMS, EMU_SMEM, rho, stop)
    assert_parity(ref, out, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["log", "kernel"])
def test_emulated_points_unbalanced_match_torch(emulated, method):
    x, y, a, b, eps = points_problem(3, 70, 33, 3, torch.float64, seed=5, pad=True)
    rho = mixed_relaxation(3, torch.float64)
    f0 = default_init(a, eps)
    C = dense_cost(x, y, "sqeuclidean", 1.0)
    kw = {"max_iter": 60, "tol": 1e-9, "method": method}
    ref = relaxed_reference(C, a, b, eps, f0, rho, "marginals", **kw)
    table = table_of(C, eps, None)
    out = emulated.solve_points(
        x, y, a, b, f0, table, 60, 1e-9, method, "sqeuclidean", 1.0, EMU_SMS, rho, "marginals"
    )
    assert_parity(ref, out, torch.float64)


# Point clouds (B, N, M, D): B = 1 and B > 1; N, M in {1, 7, 33, 70} (one and two tiles
# of 64, tails); D in {1, 3} (one chunk of 4 dimensions, the outer tile resident) and
# {17, 64} (chunks of 16, a tail); and the inner range split over blocks or not.
EMU_POINTS = [(1, 7, 33, 3), (2, 33, 7, 1), (2, 70, 33, 17), (1, 33, 70, 64), (1, 1, 7, 3)]


def points_parity(emulated, shape, cost, method, dtype, *, sm_count=EMU_SMS, **kw):
    B, N, M, D = shape
    x, y, a, b, eps = points_problem(B, N, M, D, dtype, seed=N + M + D, pad=N > 8)
    scale = unit_scale(cost, D)
    f0 = default_init(a, eps)
    run = {"max_iter": 60, "tol": TOL[dtype], "method": method, **kw}
    ref = torch_solve(dense_cost(x, y, cost, scale), a, b, eps, f0, **run)
    out = emu_points(
        emulated, x, y, a, b, eps, f0, cost=cost, cost_scale=scale, sm_count=sm_count, **run
    )
    assert_parity(ref, out, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("shape", EMU_POINTS, ids=lambda s: "x".join(map(str, s)))
def test_emulated_points_match_torch_f64(emulated, shape, cost, method):
    points_parity(emulated, shape, cost, method, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("cost", list(COSTS))
def test_emulated_points_match_torch_f32(emulated, cost, method):
    points_parity(emulated, (2, 70, 33, 17), cost, method, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize(("d", "sm_count"), [(3, EMU_SMS), (17, EMU_SMS), (3, 0)])
def test_emulated_point_softmin_matches_logsumexp(emulated, cost, dtype, d, sm_count):
    """The CUDA point_softmin (the row pass of solve_points on its own) against the dense
    log-sum-exp in float64: both dimension chunkings (D <= 4, D > 4), the inner range split
    over blocks (then merged by the combine pass) and not (sm_count=0), dropped points
    (h = -inf) and a problem whose every point is dropped (+inf)."""
    gen = torch.Generator().manual_seed(d)
    B, N, M = 3, 70, 150
    x = torch.randn(B, N, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, M, d, generator=gen, dtype=torch.float64)
    h = torch.randn(B, M, generator=gen, dtype=torch.float64)
    h[0, 5:40] = float("-inf")
    h[2] = float("-inf")
    eps = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    out = emulated.point_softmin(
        x.to(dtype), y.to(dtype), h.to(dtype), eps.to(dtype), cost, 0.7, sm_count
    )
    C = 0.7 * dense_cost(x, y, cost, 1.0)
    want = -eps.view(B, 1) * torch.logsumexp((h.unsqueeze(1) - C) / eps.view(B, 1, 1), dim=2)
    assert bool(torch.isposinf(out[2]).all())
    gap = ((out[:2].double() - want[:2]).abs() / want[:2].abs().clamp_min(1)).max()
    assert float(gap) <= (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cost", list(COSTS))
def test_emulated_points_unsplit_inner_range(emulated, cost):
    """A fake device with no multiprocessors: the planner never splits the inner range, so
    one block walks several inner tiles (no combine pass)."""
    points_parity(emulated, (1, 33, 70, 17), cost, "log", torch.float64, sm_count=0)


@pytest.mark.slow
@pytest.mark.parametrize("cost", list(COSTS))
def test_emulated_points_annealing_and_fixed_iterations(emulated, cost):
    x, y, a, b, eps = points_problem(2, 19, 13, 3, torch.float64, seed=3, pad=True, eps=0.05)
    scale = unit_scale(cost, 3)
    C = dense_cost(x, y, cost, scale)
    f0 = default_init(a, eps) + 0.1  # a warm start
    for kw in [
        {"max_iter": 40, "tol": 1e-9, "method": "log", "eps_scaling": 0.6},
        {"max_iter": 7, "tol": None, "method": "kernel", "eps_scaling": 0.5},
        {"max_iter": 6, "tol": None, "method": "log"},
        {"max_iter": 0, "tol": 1e-9, "method": "log"},
    ]:
        if kw.get("eps_scaling"):
            assert table_of(C, eps, kw["eps_scaling"]).shape[1] > 1
        ref = torch_solve(C, a, b, eps, f0, **kw)
        out = emu_points(emulated, x, y, a, b, eps, f0, cost=cost, cost_scale=scale, **kw)
        assert_parity(ref, out, torch.float64)


@pytest.mark.slow
def test_emulated_points_kernel_underflow_returns_non_finite(emulated):
    x, y, a, b, eps = points_problem(2, 6, 9, 3, torch.float32, eps=1e-3)
    f0 = default_init(a, eps)
    kw = {"cost": "sqeuclidean", "cost_scale": 100.0, "max_iter": 20, "tol": 1e-5}
    _, g, _, err = emu_points(emulated, x, y, a, b, eps, f0, method="kernel", **kw)
    assert not (bool(torch.isfinite(err).all()) and bool(torch.isfinite(g).all()))
    with pytest.raises(KernelUnderflowError):
        check_finite(
            "kernel", *emu_points(emulated, x, y, a, b, eps, f0, method="kernel", **kw)[:2], err
        )
    f, g, _, err = emu_points(emulated, x, y, a, b, eps, f0, method="log", **kw)
    assert bool(torch.isfinite(f).all() & torch.isfinite(g).all() & torch.isfinite(err).all())


# --------------------------------------------------------------------------------------
# On the GPU.


@pytest.fixture(scope="module")
def cuda_ok():
    ok, reason = native.availability(torch.device("cuda"), torch.float32)
    if not ok:
        if "build failed" in reason:
            pytest.fail(f"native-cuda must build on a GPU machine with nvcc: {reason}")
        pytest.skip(f"native-cuda unavailable: {reason}")


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("SINKHORN_OT_CUDA_PATH", request.param)
    return request.param


def native_dense(C, a, b, eps, f0, *, max_iter, tol, method, eps_scaling=None):
    """``torch.ops.sinkhorn_ot.solve`` called as the Python wrapper calls it."""
    table = table_of(C, eps, eps_scaling)
    out = torch.ops.sinkhorn_ot.solve(C, a, b, f0, table, int(max_iter), tol, method)
    check_finite(method, out[0], out[1], out[3])
    return out


def native_points(
    x, y, a, b, eps, f0, *, cost, cost_scale, max_iter, tol, method, eps_scaling=None
):
    """``torch.ops.sinkhorn_ot.solve_points`` called as the Python wrapper calls it."""
    table = table_of(dense_cost(x, y, cost, cost_scale), eps, eps_scaling)
    out = torch.ops.sinkhorn_ot.solve_points(
        x, y, a, b, f0, table, int(max_iter), tol, method, cost, float(cost_scale)
    )
    check_finite(method, out[0], out[1], out[3])
    return out


def both_on_gpu(C, a, b, eps, f0=None, **kw):
    if f0 is None:
        f0 = default_init(a, eps)
    ref = torch_solve(C, a, b, eps, f0, **kw)
    out = native_dense(C, a, b, eps, f0, **kw)
    assert out[0].device == C.device
    return ref, out


GPU_SHAPES = [(3, 7, 5), (4, 33, 40), (3, 64, 64), (2, 130, 70), (3, 128, 128)]


@pytest.mark.parametrize("path", ["auto", "small", "large"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_parity_with_torch_backend(shape, method, dtype, path):
    C, a, b, eps = problem(*shape, dtype, device="cuda", seed=sum(shape), pad=shape[1] > 8)
    ref, out = both_on_gpu(C, a, b, eps, max_iter=300, tol=TOL[dtype], method=method)
    assert_parity(ref, out, dtype)
    ref, out = both_on_gpu(C, a, b, eps, max_iter=25, tol=None, method=method)
    assert_parity(ref, out, dtype)


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_newton_polish_matches_cpu():
    """The default Newton polish on the GPU (native CUDA loops without momentum in its
    annealed run, torch's Cholesky for the steps) lands on the CPU's fixed point."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 60, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 70, 3, generator=gen, dtype=torch.float64) + 1
    kw = {"eps": 0.01, "grad": "none"}
    cpu = sinkhorn(PointCloud(x, y, scale=0.5), **kw)
    gpu = sinkhorn(PointCloud(x.cuda(), y.cuda(), scale=0.5), **kw)
    assert bool(gpu.converged.all()) and bool((gpu.n_iter <= 1000).all())
    plain = sinkhorn(PointCloud(x.cuda(), y.cuda(), scale=0.5), newton=False, **kw)
    assert not bool(plain.converged.any())  # the default max_iter is too short without it
    diff = (gpu.plan.to_dense().cpu() - cpu.plan.to_dense()).abs().sum((1, 2))
    assert float(diff.max()) <= 4e-5  # both within tol = 1e-5 of the same plan


@pytest.mark.parametrize("path", ["small", "large"], indirect=True)
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_annealing_warm_start_max_iter_zero(method, path):
    C, a, b, eps = problem(3, 40, 33, torch.float64, device="cuda", seed=5, eps=0.01)
    f0 = default_init(a, eps) + 0.3
    for kw in [
        {"max_iter": 400, "tol": 1e-9, "eps_scaling": 0.7},
        {"max_iter": 9, "tol": None, "eps_scaling": 0.5},
        {"max_iter": 0, "tol": 1e-9},
    ]:
        assert_parity(*both_on_gpu(C, a, b, eps, f0, method=method, **kw), torch.float64)


@pytest.mark.parametrize(
    ("shape", "offset"),
    [((2, 1500, 1500), 0), ((2, 700, 1001), 0), ((2, 600, 512), 1), ((1, 3000, 40), 0)],
    ids=["chunks", "odd-M", "unaligned", "tall"],
)
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_large_path_shapes(shape, offset):
    """Streaming kernels: several row chunks per column strip, M not a multiple of 4, a C
    that is not 16-byte aligned (scalar loads), many rows and few columns."""
    C, a, b, eps = problem(*shape, torch.float32, device="cuda", seed=11, eps=0.05)
    if offset:
        storage = torch.empty(C.numel() + offset, dtype=C.dtype, device="cuda")
        C = storage[offset:].view(C.shape).copy_(C)
        assert C.data_ptr() % 16 != 0
    ref, out = both_on_gpu(C, a, b, eps, max_iter=200, tol=1e-4, method="log")
    assert_parity(ref, out, torch.float32)


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_many_small_problems():
    C, a, b, eps = problem(4096, 32, 32, torch.float32, device="cuda", seed=1)
    ref, out = both_on_gpu(C, a, b, eps, max_iter=200, tol=1e-4, method="log")
    assert_parity(ref, out, torch.float32)
    assert float((out[2] != ref[2]).float().mean()) <= 0.01  # off-by-one stops are rare


@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_sinkhorn_native_equals_torch_backend(method):
    C, a, b, _ = problem(6, 25, 30, torch.float64, device="cuda", seed=7)
    kw = {"eps": 0.05, "method": method, "tol": 1e-10, "max_iter": 5000, "grad": "none"}
    res_n = sinkhorn(C, a, b, backend="native", **kw)
    res_t = sinkhorn(C, a, b, backend="torch", **kw)
    assert res_n.backend == "native" and res_t.backend == "torch"
    assert res_n.plan.device.type == "cuda"
    assert torch.equal(res_n.n_iter, res_t.n_iter)
    assert_close_rel(res_n.plan, res_t.plan, 1e-9, "plan")
    assert_close_rel(res_n.value, res_t.value, 1e-10, "value")
    assert sinkhorn(C, a, b, **kw).backend == "native"  # auto picks native on the GPU


@pytest.mark.parametrize("path", ["small", "large"], indirect=True)
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_unbalanced_native_equals_torch_backend(method, path):
    """Relaxed, semi-relaxed and balanced problems of one batch, dense and points."""
    C, a, b, _ = problem(6, 25, 30, torch.float64, device="cuda", seed=8, pad=True)
    rho_a = torch.tensor([0.5, INF, 1.0, INF, 2.0, INF], dtype=torch.float64, device="cuda")
    kw = {"eps": 0.05, "method": method, "tol": 1e-10, "max_iter": 5000, "grad": "none"}
    kw |= {"rho_a": rho_a, "rho_b": 1.5}
    res_n = sinkhorn(C, a, 2 * b, backend="native", **kw)
    res_t = sinkhorn(C, a, 2 * b, backend="torch", **kw)
    assert torch.equal(res_n.n_iter, res_t.n_iter)
    assert_close_rel(res_n.plan, res_t.plan, 1e-9, "plan")
    assert_close_rel(res_n.value, res_t.value, 1e-10, "value")
    x, y, a, b, _ = points_problem(2, 70, 33, 3, torch.float64, device="cuda", pad=True)
    kw |= {"eps": 0.2, "rho_a": 1.0}
    pts_n = sinkhorn(PointCloud(x, y), a, b, backend="native", **kw)
    pts_t = sinkhorn(PointCloud(x, y), a, b, backend="torch", **kw)
    assert torch.equal(pts_n.n_iter, pts_t.n_iter)
    assert_close_rel(pts_n.f, pts_t.f, 1e-9, "f")


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_matches_pot():
    ot = pytest.importorskip("ot")
    C, a, b, _ = problem(4, 12, 10, torch.float64, device="cuda", seed=22)
    eps = 0.05
    res = sinkhorn(
        C, a, b, eps=eps, method="log", tol=1e-13, max_iter=20000, grad="none", backend="native"
    )
    for k in range(4):
        P = ot.bregman.sinkhorn_log(a[k], b[k], C[k], eps, numItermax=20000, stopThr=1e-13)
        assert P.device.type == "cuda"
        scale = float(P.abs().max())
        assert_close_rel(res.plan[k] / scale, P / scale, 1e-7, "plan vs POT sinkhorn_log")
    pot = ot.solve_batch(
        C,
        eps,
        a,
        b,
        max_iter=20000,
        tol=1e-13,
        method="log_sinkhorn",
        reg_type="kl",
        grad="detach",
    )
    scale = float(pot.plan.abs().max())
    assert_close_rel(res.plan / scale, pot.plan / scale, 1e-7, "plan vs POT solve_batch")


GRAD_MODES = ["unroll", "implicit", "envelope"]


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_gradients_match_cpu(grad):
    """Each gradient mode that exists gives the same gradients on the GPU (native backend
    where the mode allows it, torch for unroll) as on the CPU."""
    C, a, b, _ = problem(3, 9, 7, torch.float64, seed=31)
    weight = torch.rand(C.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for device in ["cpu", "cuda"]:
        Cd = C.detach().clone().to(device).requires_grad_(True)  # fresh leaves per device
        ad = a.detach().clone().to(device).requires_grad_(True)
        try:
            res = sinkhorn(Cd, ad, b.to(device), eps=0.1, tol=1e-12, max_iter=5000, grad=grad)
        except NotImplementedError as exc:
            pytest.skip(f"grad={grad!r} is not implemented: {exc}")
        if device == "cuda":
            assert res.backend == ("torch" if grad == "unroll" else "native")
        loss = res.value.sum()
        if grad != "envelope":  # envelope differentiates the value only
            loss = loss + (res.plan * weight.to(device)).sum()
        loss.backward()
        grads[device] = (Cd.grad.cpu(), ad.grad.cpu())
    for (g_cpu, g_gpu), name in zip(zip(grads["cpu"], grads["cuda"]), ["C", "a"]):
        assert_close_rel(g_gpu, g_cpu, 1e-7, f"gradient w.r.t. {name}")


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_torch_compile():
    C, a, b, _ = problem(5, 16, 12, torch.float32, device="cuda", seed=41)

    def fn(C, a, b):
        res = sinkhorn(C, a, b, eps=0.1, tol=1e-5, max_iter=2000, grad="none", backend="native")
        return res.plan * 2.0, res.value

    plan, value = torch.compile(fn)(C, a, b)
    plan_e, value_e = fn(C, a, b)
    assert_close_rel(plan, plan_e, 1e-5, "plan")
    assert_close_rel(value, value_e, 1e-5, "value")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_opcheck(dtype):
    C, a, b, eps = problem(3, 8, 6, dtype, device="cuda")
    table = table_of(C, eps, 0.5)
    args = (C, a, b, default_init(a, eps), table, 50, 1e-6, "log")
    torch.library.opcheck(torch.ops.sinkhorn_ot.solve.default, args)
    x, y, a, b, eps = points_problem(3, 8, 6, 5, dtype, device="cuda")
    args = (x, y, a, b, default_init(a, eps), eps.unsqueeze(-1), 50, None, "kernel", "cosine", 1.0)
    torch.library.opcheck(torch.ops.sinkhorn_ot.solve_points.default, args)


@pytest.mark.parametrize("path", ["small", "large"], indirect=True)
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_kernel_underflow_raises(path):
    C, a, b, eps = problem(2, 6, 9, torch.float32, device="cuda", eps=1e-3)
    with pytest.raises(KernelUnderflowError):
        native_dense(
            100 * C, a, b, eps, default_init(a, eps), max_iter=20, tol=1e-5, method="kernel"
        )
    # The log form is stable at the same eps.
    f, _, _, err = native_dense(
        100 * C, a, b, eps, default_init(a, eps), max_iter=20, tol=1e-5, method="log"
    )
    assert bool(torch.isfinite(f).all()) and not math.isnan(float(err.max()))


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_op_runs_on_the_current_stream_and_device_guard():
    C, a, b, eps = problem(4, 20, 20, torch.float32, device="cuda", seed=9)
    f0 = default_init(a, eps)
    expected = native_dense(C, a, b, eps, f0, max_iter=50, tol=None, method="log")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = native_dense(C, a, b, eps, f0, max_iter=50, tol=None, method="log")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for x, y in zip(got, expected):
        assert torch.equal(x, y)  # deterministic: same bits on any stream


GPU_POINTS = [
    (1, 7, 5, 1),
    (3, 130, 70, 3),
    (2, 333, 1000, 17),
    (2, 700, 257, 64),
    (1, 64, 64, 1024),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["log", "kernel"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.parametrize("shape", GPU_POINTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_points_match_torch_on_dense_cost(shape, cost, method, dtype):
    N, D = shape[1], shape[3]
    x, y, a, b, eps = points_problem(*shape, dtype, device="cuda", seed=sum(shape), pad=N > 8)
    scale = unit_scale(cost, D)
    C = dense_cost(x, y, cost, scale)
    f0 = default_init(a, eps)
    for kw in [
        {"max_iter": 300, "tol": TOL[dtype]},
        {"max_iter": 25, "tol": None},
        {"max_iter": 300, "tol": TOL[dtype], "eps_scaling": 0.5},
    ]:
        ref = torch_solve(C, a, b, eps, f0, method=method, **kw)
        out = native_points(x, y, a, b, eps, f0, cost=cost, cost_scale=scale, method=method, **kw)
        assert out[0].device == x.device
        assert_parity(ref, out, dtype)


@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_points_large_batch_and_underflow():
    x, y, a, b, eps = points_problem(64, 40, 50, 3, torch.float32, device="cuda", seed=2)
    C = dense_cost(x, y, "sqeuclidean", 1.0)
    f0 = default_init(a, eps)
    kw = {"max_iter": 500, "tol": 1e-4, "method": "log"}
    ref = torch_solve(C, a, b, eps, f0, **kw)
    out = native_points(x, y, a, b, eps, f0, cost="sqeuclidean", cost_scale=1.0, **kw)
    assert_parity(ref, out, torch.float32)
    with pytest.raises(KernelUnderflowError):
        native_points(
            x,
            y,
            a,
            b,
            eps / 1000,
            f0,
            cost="sqeuclidean",
            cost_scale=100.0,
            max_iter=20,
            tol=1e-5,
            method="kernel",
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cost", list(COSTS))
@pytest.mark.usefixtures("cuda_ok")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU")
def test_gpu_point_softmin_and_divergence(cost, dtype):
    """point_softmin on the device against the dense log-sum-exp, and a ragged divergence
    whose updates run on it against the torch backend on the same GPU."""
    from sinkhorn_ot import ops, pad_points, sinkhorn_divergence

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 300, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 700, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(3, 700, generator=gen, dtype=torch.float64)
    h[1, :100] = float("-inf")
    eps = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    out = ops.point_softmin(*(t.to("cuda", dtype) for t in (x, y, h, eps)), cost=cost,
                            cost_scale=0.5)  # fmt: skip
    C = 0.5 * dense_cost(x, y, cost, 1.0)
    want = -eps.view(3, 1) * torch.logsumexp((h.unsqueeze(1) - C) / eps.view(3, 1, 1), dim=2)
    assert_close_rel(out.cpu().double(), want, 1e-12 if dtype == torch.float64 else 1e-5, "out")
    lengths = torch.tensor([300, 120, 0], device="cuda")
    short = ops.point_softmin(*(t.to("cuda", dtype) for t in (x, y, h, eps)), cost=cost,
                              cost_scale=0.5, row_lengths=lengths)  # fmt: skip
    assert torch.equal(short[0], out[0]) and torch.equal(short[1, :120], out[1, :120])
    assert bool((short[1, 120:] == 0).all()) and bool((short[2] == 0).all())
    if cost != "sqeuclidean":
        return
    clouds = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (400, 250, 90)]
    targets = [torch.randn(m, 3, generator=gen, dtype=torch.float64) + 0.5 for m in (300, 500, 60)]
    xs, ys, a, b = (t.to("cuda", dtype) for t in pad_points(clouds, targets))
    values = {
        be: sinkhorn_divergence(xs, ys, a, b, blur=0.05, backend=be) for be in ("native", "torch")
    }
    assert_close_rel(
        values["native"], values["torch"], 1e-10 if dtype == torch.float64 else 1e-4, "S"
    )
