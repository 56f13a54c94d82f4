"""Native CPU backend: parity with the torch backend, op registration, loading.

The oracle is the torch backend (`sinkhorn_ot._loop.solve_potentials`): the native loop
must give the same potentials (1e-10 relative in float64, 1e-5 in float32), the same
per-problem iteration counts and the same errors. These tests skip only when the C++
toolchain itself is missing; a native build that fails makes them fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from sinkhorn_ot import KernelUnderflowError, _build, native, ops, pad_batch, sinkhorn
from sinkhorn_ot._loop import eps_table
from sinkhorn_ot._loop import solve_potentials as torch_solve
from sinkhorn_ot.testing import assert_close_rel, default_init, random_problem


def _toolchain_missing() -> str | None:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed"
    if not native.enabled():
        return f"native backends disabled by {native.ENV_SWITCH}=0"
    return None


_MISSING = _toolchain_missing()
if _MISSING is not None:
    pytest.skip(f"native-cpu cannot be built here: {_MISSING}", allow_module_level=True)

DTYPES = [torch.float64, torch.float32]
METHODS = ["log", "kernel"]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, reason = native.availability(torch.device("cpu"), torch.float64)
    assert ok, f"the native CPU backend must build on a machine with a toolchain: {reason}"


def both(C, a, b, eps, f0=None, **kw):
    if f0 is None:
        f0 = default_init(a, eps)
    ref = torch_solve(C, a, b, eps, f0, **kw)
    out = native.solve_potentials(C, a, b, eps, f0, **kw)
    return ref, out


def assert_parity(ref, out, dtype):
    rtol = RTOL[dtype]
    (f_r, g_r, it_r, err_r), (f_n, g_n, it_n, err_n) = ref, out
    assert f_n.dtype == dtype and g_n.dtype == dtype
    assert it_n.dtype == torch.int64 and err_n.dtype == torch.float64
    assert torch.equal(it_n, it_r), f"n_iter: native {it_n.tolist()} vs torch {it_r.tolist()}"
    assert_close_rel(f_n, f_r, rtol, "f")
    assert_close_rel(g_n, g_r, rtol, "g")
    # err is a relative violation: compare it relative to the tolerance scale.
    assert_close_rel(err_n, err_r, 100 * rtol, "err")


def problem(batch, n, m, dtype, seed=0, eps=0.1):
    C, a, b = random_problem(batch, n, m, dtype=dtype, seed=seed)
    return C, a, b, torch.full((batch,), eps, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape", [(3, 7, 5), (2, 33, 70), (4, 1, 9), (2, 9, 1), (1, 128, 100), (5, 16, 16)]
)
def test_parity_fixed_iterations(shape, method, dtype):
    C, a, b, eps = problem(*shape, dtype)
    ref, out = both(C, a, b, eps, max_iter=40, tol=None, method=method)
    assert_parity(ref, out, dtype)
    assert bool((out[2] == 40).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_parity_early_stopping_per_problem(method, dtype):
    # Different eps per problem: the problems converge after different counts.
    C, a, b, _ = problem(6, 20, 30, dtype, seed=1)
    eps = torch.tensor([0.5, 0.2, 0.1, 0.08, 0.3, 0.15], dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, max_iter=2000, tol=tol, method=method)
    assert_parity(ref, out, dtype)
    assert len(set(out[2].tolist())) > 1, "the problems should stop at different iterations"
    assert bool((out[3] <= tol).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_parity_ragged_padding(method, dtype):
    gen = torch.Generator().manual_seed(3)
    sizes = [(5, 6), (3, 4), (9, 2), (1, 7), (13, 11)]
    costs = [torch.rand(n, m, generator=gen, dtype=dtype) for n, m in sizes]
    C, a, b = pad_batch(costs)
    eps = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.07], dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, max_iter=3000, tol=tol, method=method)
    assert_parity(ref, out, dtype)
    # Padding is exact: each padded problem equals the same problem solved alone.
    for k, (n, m) in enumerate(sizes):
        single = native.solve_potentials(
            C[k : k + 1, :n, :m].contiguous(),
            a[k : k + 1, :n],
            b[k : k + 1, :m],
            eps[k : k + 1],
            default_init(a[k : k + 1, :n], eps[k : k + 1]),
            max_iter=3000,
            tol=tol,
            method=method,
        )
        assert int(single[2]) == int(out[2][k])
        assert_close_rel(single[0][0], out[0][k, :n], RTOL[dtype], f"f of problem {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 12, 10), (3, 41, 70)])
def test_parity_interior_zero_weights(shape, dtype):
    # Zeros inside the problem (not trailing padding), also in the first vector/tile.
    C, a, b, eps = problem(*shape, dtype, seed=4)
    a[:, 3] = 0
    a[1, 0] = 0
    b[:, 5] = 0
    b[1, :2] = 0
    b[2, -1] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    for method in METHODS:
        ref, out = both(C, a, b, eps, max_iter=50, tol=None, method=method)
        assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_parity_warm_start(method, dtype):
    C, a, b, eps = problem(4, 17, 23, dtype, seed=5)
    f0 = torch.randn(4, 17, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.1
    ref, out = both(C, a, b, eps, f0=f0, max_iter=25, tol=None, method=method)
    assert_parity(ref, out, dtype)
    # A warm start from a solution stops immediately, in both backends.
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    ref, out = both(C, a, b, eps, f0=ref[0], max_iter=500, tol=tol, method=method)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_parity_eps_scaling(method, dtype):
    C, a, b, _ = problem(3, 15, 12, dtype, seed=6)
    eps = torch.tensor([0.02, 0.05, 0.03], dtype=dtype)
    # Kernel form: stay in the range where exp(-C / eps) does not underflow.
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    ref, out = both(C, a, b, eps, max_iter=3000, tol=tol, method=method, eps_scaling=0.7)
    assert_parity(ref, out, dtype)
    ref, out = both(C, a, b, eps, max_iter=6, tol=None, method=method, eps_scaling=0.5)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_max_iter_zero(dtype):
    C, a, b, eps = problem(2, 5, 6, dtype)
    for method in METHODS:
        ref, out = both(C, a, b, eps, max_iter=0, tol=1e-5, method=method)
        assert_parity(ref, out, dtype)
        assert out[2].tolist() == [0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_parity_large_problem_both_parallel_paths(dtype, threads):
    # B = 1: each half-step split over threads; B = 8 small: whole problems per thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 300, 257), (8, 40, 33)]:
            C, a, b, eps = problem(*shape, dtype, seed=7, eps=0.05)
            for method in METHODS:
                ref, out = both(C, a, b, eps, max_iter=30, tol=None, method=method)
                assert_parity(ref, out, dtype)
    finally:
        torch.set_num_threads(previous)


def test_results_do_not_depend_on_thread_count():
    C, a, b, eps = problem(1, 200, 301, torch.float32, seed=8, eps=0.05)
    f0 = default_init(a, eps)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(
                native.solve_potentials(C, a, b, eps, f0, max_iter=20, tol=None, method="log")
            )
    finally:
        torch.set_num_threads(previous)
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y)


def test_float32_default_tol_is_reachable():
    C, a, b = random_problem(16, 64, 64, dtype=torch.float32, seed=9)
    res = sinkhorn(C, a, b, eps=0.05, tol=1e-5, grad="none", backend="native", max_iter=5000)
    assert res.backend == "native"
    assert bool(res.converged.all()), f"err {res.err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_underflow_raises_like_torch(dtype):
    C, a, b, _ = problem(2, 8, 9, dtype)
    C = C * 50
    eps = torch.full((2,), 1e-3, dtype=dtype)
    f0 = default_init(a, eps)
    kw = {"max_iter": 20, "tol": 1e-6, "method": "kernel"}
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        torch_solve(C, a, b, eps, f0, **kw)
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        native.solve_potentials(C, a, b, eps, f0, **kw)
    # The log domain handles the same problem.
    kw["method"] = "log"
    ref, out = both(C, a, b, eps, **kw)
    assert_parity(ref, out, dtype)


@pytest.mark.parametrize("method", ["log", "kernel", "auto"])
def test_sinkhorn_native_equals_torch_backend(method):
    C, a, b = random_problem(3, 11, 14, seed=10)
    kw = {"eps": 0.1, "method": method, "grad": "none", "tol": 1e-9}
    res_t = sinkhorn(C, a, b, backend="torch", **kw)
    res_n = sinkhorn(C, a, b, backend="native", **kw)
    assert res_n.backend == "native" and res_t.backend == "torch"
    assert res_n.method == res_t.method
    assert torch.equal(res_n.n_iter, res_t.n_iter)
    for name in ("plan", "f", "g", "value"):
        assert_close_rel(getattr(res_n, name), getattr(res_t, name), 1e-10, name)


def test_native_matches_pot_log_sinkhorn():
    ot = pytest.importorskip("ot")
    C, a, b = random_problem(2, 9, 12, seed=11)
    res = sinkhorn(C, a, b, eps=0.05, tol=1e-12, max_iter=20000, grad="none", backend="native")
    for k in range(2):
        plan = ot.bregman.sinkhorn_log(
            a[k].numpy(), b[k].numpy(), C[k].numpy(), 0.05, numItermax=20000, stopThr=1e-13
        )
        diff = float((res.plan[k] - torch.from_numpy(plan)).abs().max())
        assert diff < 1e-9, diff


# --- the op itself -------------------------------------------------------------------


def op_args(dtype, method="log", tol=1e-6, scaling=None):
    C, a, b, eps = problem(3, 6, 5, dtype, seed=12)
    table = eps_table(eps, C.abs().amax(dim=(1, 2)), scaling)
    return (C, a, b, default_init(a, eps), table, 50, tol, method)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_opcheck(dtype, method):
    torch.library.opcheck(torch.ops.sinkhorn_ot.solve.default, op_args(dtype, method))
    args = op_args(dtype, method, tol=None, scaling=0.5)
    assert args[4].shape[1] > 1
    torch.library.opcheck(torch.ops.sinkhorn_ot.solve.default, args)


def test_op_traces_under_torch_compile():
    args = op_args(torch.float64)

    def fn(C, a, b, f0, table):
        f, g, n_iter, err = torch.ops.sinkhorn_ot.solve(C, a, b, f0, table, 50, 1e-6, "log")
        return f * 2, g + 1, n_iter, err

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    expected = fn(*args[:5])
    got = compiled(*args[:5])
    for x, y in zip(got, expected):
        assert torch.equal(x, y)


def test_op_accepts_non_contiguous_inputs():
    C, *rest = op_args(torch.float64)
    Ct = C.transpose(1, 2).contiguous().transpose(1, 2)
    assert not Ct.is_contiguous()
    out = torch.ops.sinkhorn_ot.solve(Ct, *rest)
    ref = torch.ops.sinkhorn_ot.solve(C, *rest)
    for x, y in zip(out, ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_eps_table_equals_eps_scaling(method, dtype):
    # The op on the table of _loop.eps_table runs the torch loop's annealing.
    C, a, b, _ = problem(3, 15, 12, dtype, seed=6)
    eps = torch.tensor([0.02, 0.05, 0.03], dtype=dtype)
    f0 = default_init(a, eps)
    table = eps_table(eps, C.abs().amax(dim=(1, 2)), 0.7)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    ref = torch_solve(C, a, b, eps, f0, max_iter=3000, tol=tol, method=method, eps_scaling=0.7)
    out = ops.solve_dense(C, a, b, f0, table, max_iter=3000, tol=tol, method=method)
    assert_parity(ref, out, dtype)
    # Stopping waits for the last column: a table that ends later stops later.
    longer = torch.cat([table[:, :1].expand(-1, 60), table], dim=1)
    late = ops.solve_dense(C, a, b, f0, longer, max_iter=3000, tol=tol, method=method)
    assert bool((late[2] >= 60).all())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({1: torch.ones(3, 7, dtype=torch.float64)}, r"`a` must have shape \[3, 6\], got \[3, 7\]"),
        ({4: torch.ones(2, 1, dtype=torch.float64)}, r"`eps_table` must have shape \(B, S\)"),
        ({4: torch.ones(3, 0, dtype=torch.float64)}, r"`eps_table` must have shape \(B, S\)"),
        ({2: torch.ones(3, 5)}, "`b` must have the dtype of `C`"),
        ({7: "auto"}, '`method` must be "log", "kernel" or "stabilised"'),
        ({5: -1}, "`max_iter` must be >= 0"),
        ({0: torch.ones(6, 5, dtype=torch.float64)}, r"`C` must have shape \(B, N, M\)"),
    ],
)
def test_op_rejects_bad_arguments(change, match):
    args = list(op_args(torch.float64))
    for index, value in change.items():
        args[index] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sinkhorn_ot.solve(*args)


def test_wrapper_rejects_unknown_method():
    C, a, b, eps = problem(1, 3, 3, torch.float64)
    with pytest.raises(ValueError, match="`method` must be 'log', 'kernel' or 'stabilised'"):
        native.solve_potentials(C, a, b, eps, a * 0, max_iter=1, tol=None, method="auto")


def _dense_kwargs(**kw):
    return {"max_iter": 10, "tol": None, "method": "log", **kw}


@pytest.mark.parametrize(
    ("index", "value", "error", "match"),
    [
        (0, torch.ones(6, 5, dtype=torch.float64), ValueError, r"`C` must have shape \(B, N, M\)"),
        (0, torch.ones(3, 6, 5, dtype=torch.int64), TypeError, "`C` must be float32 or float64"),
        (1, torch.ones(3, 7, dtype=torch.float64), ValueError, r"`a` must have shape \(3, 6\)"),
        (2, torch.ones(3, 5), TypeError, r"`b` must have the dtype of `C` \(torch.float64\)"),
        (
            3,
            torch.ones(3, 6, dtype=torch.float64, device="meta"),
            ValueError,
            r"`f0` must be on the device of `C` \(cpu\), got meta",
        ),
        (
            4,
            torch.ones(3, dtype=torch.float64),
            ValueError,
            r"`eps_table` must have shape \(B, S\)",
        ),
        (4, torch.ones(3, 0, dtype=torch.float64), ValueError, "with S >= 1"),
    ],
)
def test_solve_dense_rejects_bad_inputs(index, value, error, match):
    args = list(op_args(torch.float64)[:5])
    args[index] = value
    with pytest.raises(error, match=match):
        ops.solve_dense(*args, **_dense_kwargs())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "auto"}, "`method` must be 'log', 'kernel' or 'stabilised'"),
        ({"max_iter": -1}, "`max_iter` must be an int >= 0"),
        ({"tol": float("nan")}, "`tol` must be a float or None"),
    ],
)
def test_solve_dense_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ops.solve_dense(*op_args(torch.float64)[:5], **_dense_kwargs(**kw))


def test_solve_dense_needs_an_available_backend():
    C, a, b, f0, table, *_ = op_args(torch.float64)
    meta = [t.to("meta") for t in (C, a, b, f0, table)]
    with pytest.raises(RuntimeError, match=r"the native backend is unavailable: .*'meta'"):
        ops.solve_dense(*meta, **_dense_kwargs())


def test_solve_dense_detaches():
    C, a, b, f0, table, *_ = op_args(torch.float64)
    out = ops.solve_dense(C.requires_grad_(), a, b, f0, table, **_dense_kwargs())
    assert not any(t.requires_grad for t in out)


def test_errors_module_holds_the_exceptions():
    from sinkhorn_ot import _loop, errors, solver

    assert errors.KernelUnderflowError is _loop.KernelUnderflowError is KernelUnderflowError
    assert errors.NativeBuildWarning is native.NativeBuildWarning is _build.NativeBuildWarning
    assert errors.SinkhornConvergenceWarning is solver.SinkhornConvergenceWarning
    with pytest.raises(KernelUnderflowError, match="method='log'"):
        errors.raise_non_finite("kernel")


# --- loading, fallback, command line -------------------------------------------------


def test_availability_reasons():
    assert native.availability("cpu", torch.float32) == (True, "ok")
    ok, reason = native.availability("cpu", torch.float16)
    assert not ok and "float32 and float64" in reason
    ok, reason = native.availability("meta", torch.float32)
    assert not ok and "'meta'" in reason


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build(verbose):
        raise RuntimeError("Error building extension\nfoo.cpp:1:1: error: no compiler today")

    monkeypatch.setattr(_build, "_CPU", _build._Extension("native-cpu"))
    monkeypatch.setattr(_build, "_build_cpu", broken_build)
    C, a, b = random_problem(2, 4, 5, seed=13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok, reason = native.availability("cpu", torch.float64)
        res = sinkhorn(C, a, b, eps=0.1, grad="none", backend="auto")
        native.availability("cpu", torch.float64)
    assert not ok and "error: no compiler today" in reason
    assert res.backend == "torch"
    build_warnings = [w for w in caught if issubclass(w.category, native.NativeBuildWarning)]
    assert len(build_warnings) == 1
    assert "falling back to the torch backend" in str(build_warnings[0].message)
    assert "no compiler today" in str(build_warnings[0].message)
    with pytest.raises(RuntimeError, match="backend='native' is not available"):
        sinkhorn(C, a, b, eps=0.1, grad="none", backend="native")


def _run_cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "sinkhorn_ot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_cli_info_reports_every_backend():
    proc = _run_cli("info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "torch: ok"
    assert lines[1] == "native-cpu: ok"
    assert lines[2].startswith("native-cuda: ")
    status = lines[2].removeprefix("native-cuda: ")
    assert status in ("ok", "compiled, no device") or status.startswith("unavailable: ")


def test_cli_build_cpu_only_succeeds():
    proc = _run_cli("build", "--no-cuda", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "native-cpu: ok" in proc.stdout


def test_env_switch_turns_native_off():
    code = (
        "import torch; from sinkhorn_ot import native, sinkhorn; "
        "print(native.availability('cpu', torch.float64)); "
        "print(sinkhorn(torch.rand(2, 3, 4), eps=0.1, grad='none').backend)"
    )
    env = dict(os.environ, SINKHORN_OT_NATIVE="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "disabled by SINKHORN_OT_NATIVE=0" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "torch"
    info = _run_cli("info", env_extra={"SINKHORN_OT_NATIVE": "0"})
    assert "native-cpu: unavailable: disabled by SINKHORN_OT_NATIVE=0" in info.stdout


# --- the build variants ----------------------------------------------------------------


@pytest.mark.slow
def test_kernel_headers_compile_on_their_own(tmp_path):
    """Each kernel header is self-contained: it compiles alone, with this machine's
    vector flags and with ATen's generic vectors (no -mavx2), warnings as errors."""
    from torch.utils import cpp_extension

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    includes = [f"-isystem{path}" for path in cpp_extension.include_paths()]
    headers = sorted((native.CSRC / "cpu").glob("*.h"))
    assert {h.name for h in headers} >= {
        "softmin.h",
        "kernel_form.h",
        "loop.h",
        "vec_math.h",
        "point_cloud.h",
    }
    for header in headers:
        source = tmp_path / f"{header.stem}.cpp"
        source.write_text(f'#include "{header}"\n')
        for flags in (native.cpu_compile_flags(), ["-O2"]):
            cmd = [
                compiler,
                "-std=c++20",  # what torch's headers (and cpp_extension) need
                "-fsyntax-only",
                "-Wall",
                "-Wextra",
                "-Werror",
                *flags,
                *includes,
                str(source),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            assert proc.returncode == 0, f"{header.name} {flags}:\n{proc.stderr[-3000:]}"


_GENERIC_CHECK = """
import sys, torch
from torch.utils.cpp_extension import load
from sinkhorn_ot import costs, native
from sinkhorn_ot._loop import solve_potentials
from sinkhorn_ot.testing import random_problem
load(name="sinkhorn_ot_cpu_generic", sources=native.cpu_sources(), extra_cflags=["-O2"],
     extra_include_paths=[str(native.CSRC)], is_python_module=False, build_directory=sys.argv[1])
for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
    for shape in [(3, 7, 5), (2, 41, 70), (1, 300, 257)]:
        C, a, b = random_problem(*shape, dtype=dtype, seed=1)
        a[:, 0] = 0
        b[:, -1] = 0
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
        eps = torch.full((shape[0],), 0.1, dtype=dtype)
        f0 = torch.zeros(shape[:2], dtype=dtype)
        for method in ("log", "kernel"):
            ref = solve_potentials(C, a, b, eps, f0, max_iter=30, tol=1e-4, method=method)
            out = torch.ops.sinkhorn_ot.solve(C, a, b, f0, eps[:, None], 30, 1e-4, method)
            assert torch.equal(ref[2], out[2]), (ref[2], out[2])
            for x, y in zip(ref[:2], out[:2]):
                rel = float((x - y).abs().max()) / max(1.0, float(x.abs().max()))
                assert rel <= rtol, (dtype, shape, method, rel)
    for cost in ("sqeuclidean", "euclidean", "cosine"):
        for d in (3, 17):
            x = torch.rand(2, 37, d, dtype=dtype)
            y = torch.rand(2, 21, d, dtype=dtype)
            a = torch.full((2, 37), 1 / 37, dtype=dtype)
            b = torch.full((2, 21), 1 / 21, dtype=dtype)
            b[:, -3:] = 0
            b = b / b.sum(-1, keepdim=True)
            C = getattr(costs, cost)(x, y)
            eps = 0.1 * C.amax(dim=(1, 2))
            f0 = torch.zeros_like(a)
            for method in ("log", "kernel"):
                ref = solve_potentials(C, a, b, eps, f0, max_iter=30, tol=1e-4, method=method)
                out = torch.ops.sinkhorn_ot.solve_points(
                    x, y, a, b, f0, eps[:, None], 30, 1e-4, method, cost, 1.0
                )
                assert torch.equal(ref[2], out[2]), (ref[2], out[2])
                for p, q in zip(ref[:2], out[:2]):
                    rel = float((p - q).abs().max()) / max(1.0, float(p.abs().max()))
                    assert rel <= 100 * rtol, (dtype, cost, d, method, rel)
print("generic ok")
"""


@pytest.mark.slow
def test_generic_vector_build_matches_torch(tmp_path):
    """The build for CPUs without AVX2 (ATen's generic Vectorized) gives the same results."""
    proc = subprocess.run(
        [sys.executable, "-c", _GENERIC_CHECK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generic ok" in proc.stdout
