"""First contact: builds that never rebuild another install's, quiet runs, NumPy inputs.

* The native CPU extension is built in a folder keyed by what it depends on
  (:func:`sinkhorn_ot._build.build_key`): a second process loads the finished build
  without compiling (nor importing ``torch.utils.cpp_extension``), and a second install
  (a copy of the package elsewhere) builds its own folder, after which neither rebuilds.
* A build announces itself with one line on stderr; a run on a built install prints
  nothing on stderr (no ``No CUDA runtime is found, using CUDA_HOME=...``).
* ``sinkhorn``, ``emd``, ``pad_batch`` and the cost builders take NumPy arrays and
  answer in NumPy, checked against POT on the same arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkhorn_ot import _build, emd, native, pad_batch, sinkhorn
from sinkhorn_ot.costs import cosine, euclidean, sqeuclidean

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(_build.__file__).resolve().parent


def _python(code: str, *, pythonpath: Path = ROOT, timeout: float = 900):
    """Run ``code`` in a fresh interpreter with the package at ``pythonpath``."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    env.pop("SINKHORN_OT_NATIVE", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=pythonpath,
        timeout=timeout,
    )


# A process that loads (or builds) the CPU extension and says how it got it.
_LOAD = """
import json, sys
from sinkhorn_ot import _build, native
errors = native.build(cuda=False, verbose=False)
print(json.dumps({
    "error": errors["native-cpu"],
    "how": _build.LOADED.get("sinkhorn_ot_cpu"),
    "directory": str(native.build_directory("cpu")),
    "cpp_extension_imported": "torch.utils.cpp_extension" in sys.modules,
}))
"""


def _load_in_subprocess(pythonpath: Path = ROOT) -> tuple[dict, str]:
    proc = _python(_LOAD, pythonpath=pythonpath)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _library(directory: Path) -> Path:
    marker = json.loads((directory / _build.MARKER).read_text())
    return directory / marker["library"]


def _native_cpu_buildable() -> str | None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "ninja is not installed"
    if not native.enabled():
        return "native backends disabled"
    return None


needs_native = pytest.mark.skipif(
    _native_cpu_buildable() is not None, reason=f"{_native_cpu_buildable()}"
)


# --------------------------------------------------------------------------------------
# The build key and folder


def test_build_key_follows_sources_location_and_environment(tmp_path, monkeypatch):
    spec = _build._cpu_spec()
    key = _build.build_key(spec)
    assert key == _build.build_key(_build._cpu_spec())  # deterministic
    assert native.build_directory("cpu").name == f"sinkhorn_ot_cpu_{key}"

    # A second checkout: the same sources elsewhere.
    shutil.copytree(_build.CSRC, tmp_path / "csrc")
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    elsewhere = _build.build_key(_build._cpu_spec())
    assert elsewhere != key
    # A header edit (headers are not sources, ninja alone would miss nothing; the key
    # must not either).
    header = tmp_path / "csrc" / "cpu" / "softmin.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _build.build_key(_build._cpu_spec()) != elsewhere
    monkeypatch.undo()

    # Another virtual environment of this checkout, or other flags.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert _build.build_key(_build._cpu_spec()) != key
    monkeypatch.undo()
    spec_o2 = dict(spec, extra_cflags=["-O2"])
    assert _build.build_key(spec_o2) != key


def test_extensions_root_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _build.extensions_root() == tmp_path
    assert native.build_directory("cpu").parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    root = _build.extensions_root()
    assert "torch_extensions" in root.parts
    assert root.name.startswith(f"py{sys.version_info.major}{sys.version_info.minor}")


def test_a_build_announces_itself_once_and_leaves_a_marker(tmp_path, monkeypatch, capsys):
    """The build path with a stand-in compiler: one line on stderr, then a marker, and a
    later load of the same key goes straight to the library."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiled, loaded = [], []

    class FakeCppExtension:
        CUDA_HOME = None

        @staticmethod
        def load(name, sources, build_directory, **kwargs):
            compiled.append(name)
            library = Path(build_directory) / f"{name}.so"
            library.write_bytes(b"")
            return str(library)

    monkeypatch.setattr(_build, "_cpp_extension", lambda: FakeCppExtension)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(_build, "LOADED", {})
    spec = {
        "name": "sinkhorn_ot_fake",
        "what": "a stand-in",
        "duration": "no time",
        "sources": [],
        "depends": [],
        "extra_include_paths": [],
    }
    first = _build._load(spec, verbose=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sinkhorn_ot: building a stand-in")
    assert "no time" in err and str(Path(first).parent) in err
    assert _build.LOADED["sinkhorn_ot_fake"] == "compiled"
    marker = json.loads((Path(first).parent / _build.MARKER).read_text())
    assert marker["key"] == _build.build_key(spec)
    assert marker["library"] == "sinkhorn_ot_fake.so"

    second = _build._load(spec, verbose=False)
    assert second == first and compiled == ["sinkhorn_ot_fake"] and loaded == [first]
    assert _build.LOADED["sinkhorn_ot_fake"] == "cached"
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------
# No rebuilds: a second process, a second install


@needs_native
def test_second_process_loads_the_build_without_compiling():
    assert native.build(cuda=False, verbose=False)["native-cpu"] is None
    directory = native.build_directory("cpu")
    library = _library(directory)
    before = library.stat().st_mtime_ns
    report, stderr = _load_in_subprocess()
    assert report == {
        "error": None,
        "how": "cached",
        "directory": str(directory),
        "cpp_extension_imported": False,
    }
    assert stderr == ""
    assert library.stat().st_mtime_ns == before


@needs_native
@pytest.mark.slow
def test_second_install_builds_its_own_folder_and_neither_rebuilds(tmp_path):
    """The issue's case: two checkouts used to rebuild each other's build on every
    switch. Here the second one (a copy of the package) builds once, in its own folder,
    and then both just load."""
    assert native.build(cuda=False, verbose=False)["native-cpu"] is None
    first_dir = native.build_directory("cpu")
    first_lib = _library(first_dir)
    first_mtime = first_lib.stat().st_mtime_ns

    other = tmp_path / "checkout2"
    shutil.copytree(PACKAGE, other / "sinkhorn_ot", ignore=shutil.ignore_patterns("__pycache__"))
    second_dir = None
    try:
        report, stderr = _load_in_subprocess(other)
        second_dir = Path(report["directory"])
        assert report["error"] is None and report["how"] == "compiled"
        assert second_dir != first_dir and second_dir.parent == first_dir.parent
        announcements = [line for line in stderr.splitlines() if line.startswith("sinkhorn_ot:")]
        assert len(announcements) == 1 and "building the native CPU kernels" in announcements[0]
        second_mtime = _library(second_dir).stat().st_mtime_ns

        for pythonpath, directory in ((ROOT, first_dir), (other, second_dir)):
            report, stderr = _load_in_subprocess(pythonpath)
            assert report["how"] == "cached" and Path(report["directory"]) == directory
            assert not report["cpp_extension_imported"] and stderr == ""
        assert first_lib.stat().st_mtime_ns == first_mtime
        assert _library(second_dir).stat().st_mtime_ns == second_mtime
    finally:
        if second_dir is not None:
            shutil.rmtree(second_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Quiet


@needs_native
def test_a_solve_on_a_built_install_prints_nothing_on_stderr():
    assert native.build(cuda=False, verbose=False)["native-cpu"] is None
    proc = _python(
        "import torch, sinkhorn_ot\n"
        "res = sinkhorn_ot.sinkhorn(torch.rand(4, 5, dtype=torch.float64), eps=0.1)\n"
        "print(res.backend)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "native"
    assert proc.stderr == ""


def test_importing_cpp_extension_through_build_is_quiet():
    proc = _python("from sinkhorn_ot import _build\n_build._cpp_extension()\n")
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_HOME" not in proc.stderr and "No CUDA runtime" not in proc.stderr


# --------------------------------------------------------------------------------------
# NumPy inputs, against POT on the same arrays

ot = pytest.importorskip("ot")


def _pot_problem(seed=0, n=6, m=9):
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 2)), rng.random((m, 2))
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def test_cost_builders_take_arrays_like_ot_dist():
    x, y, _, _ = _pot_problem()
    M = sqeuclidean(x, y)
    assert isinstance(M, np.ndarray) and M.dtype == np.float64
    np.testing.assert_allclose(M, ot.dist(x, y), atol=1e-14)
    np.testing.assert_allclose(euclidean(x, y), ot.dist(x, y, metric="euclidean"), atol=1e-12)
    np.testing.assert_allclose(cosine(x, y), ot.dist(x, y, metric="cosine"), atol=1e-12)
    # A tensor anywhere: tensors back.
    assert isinstance(sqeuclidean(torch.from_numpy(x), y), torch.Tensor)


def test_sinkhorn_on_numpy_arrays_matches_pot(backend):
    x, y, a, b = _pot_problem()
    M = ot.dist(x, y)
    reg = 0.05
    res = sinkhorn(M, a, b, eps=reg, tol=1e-13, max_iter=100000, backend=backend)
    P = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=1e-15, numItermax=100000)
    cost = ot.sinkhorn2(a, b, M, reg, method="sinkhorn_log", stopThr=1e-15, numItermax=100000)
    for name in ("plan", "f", "g"):
        assert isinstance(getattr(res, name), np.ndarray), name
    for name in ("value", "value_linear", "err", "n_iter", "converged"):  # 0-d: scalars
        assert isinstance(getattr(res, name), np.generic), name
    assert res.plan.dtype == np.float64 and res.plan.shape == M.shape
    assert isinstance(res.value_linear, np.floating) and isinstance(res.converged, np.bool_)
    assert res.backend == backend and bool(res.converged)
    np.testing.assert_allclose(res.plan, P, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(res.value_linear, cost, rtol=1e-10)
    # The same arrays as tensors give the same numbers, as tensors.
    t = sinkhorn(torch.from_numpy(M), torch.from_numpy(a), torch.from_numpy(b), eps=reg,
                 tol=1e-13, max_iter=100000, backend=backend)  # fmt: skip
    assert isinstance(t.plan, torch.Tensor)
    np.testing.assert_array_equal(t.plan.numpy(), res.plan)


def test_batched_numpy_inputs_eps_array_and_warm_start(backend):
    rng = np.random.default_rng(3)
    C = rng.random((3, 5, 4))
    eps = np.array([0.05, 0.1, 0.2])
    res = sinkhorn(C, eps=eps, tol=1e-12, max_iter=100000, backend=backend)
    assert res.plan.shape == (3, 5, 4) and res.value.shape == (3,)
    for k in range(3):
        P = ot.sinkhorn(np.full(5, 0.2), np.full(4, 0.25), C[k], eps[k],
                        method="sinkhorn_log", stopThr=1e-14, numItermax=100000)  # fmt: skip
        np.testing.assert_allclose(res.plan[k], P, rtol=1e-7, atol=1e-15)
    warm = sinkhorn(C, eps=eps, tol=1e-12, max_iter=100000, init=(res.f, res.g), backend=backend)
    assert isinstance(warm.plan, np.ndarray) and (warm.n_iter <= 1).all()


def test_lists_integers_and_mixed_inputs():
    # Nested lists and integer arrays read as float64, answered in NumPy.
    res = sinkhorn([[0, 1], [1, 0]], eps=0.1)
    assert isinstance(res.plan, np.ndarray) and res.plan.dtype == np.float64
    np.testing.assert_array_equal(res.plan, sinkhorn(np.array([[0.0, 1], [1, 0]]), eps=0.1).plan)
    # A read-only, negatively strided array is copied, not rejected.
    C = np.random.default_rng(1).random((4, 3))[::-1]
    C.flags.writeable = False
    assert isinstance(sinkhorn(C, eps=0.1).plan, np.ndarray)
    # A tensor among the inputs: tensors out, the arrays moved to its device.
    a = np.full(4, 0.25)
    out = sinkhorn(torch.from_numpy(C.copy()), a, eps=0.1)
    assert isinstance(out.plan, torch.Tensor) and out.plan.dtype == torch.float64


def test_emd_and_pad_batch_on_arrays():
    x, y, a, b = _pot_problem(seed=2)
    M = ot.dist(x, y)
    res = emd(M, a, b)
    assert isinstance(res.plan, np.ndarray) and isinstance(res.value, np.floating)
    np.testing.assert_allclose(res.value, ot.emd2(a, b, M), rtol=1e-10)
    np.testing.assert_allclose(res.plan.sum(1), a, atol=1e-12)

    C, pa, pb = pad_batch([M, M[:3, :4]], [a, None], [b, None])
    assert all(isinstance(t, np.ndarray) for t in (C, pa, pb)) and C.shape == (2, 6, 9)
    batch = sinkhorn(C, pa, pb, eps=0.05, tol=1e-12, max_iter=100000)
    P = ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", stopThr=1e-14, numItermax=100000)
    np.testing.assert_allclose(batch.plan[0], P, rtol=1e-7, atol=1e-15)
    assert (batch.plan[1, 3:] == 0).all() and (batch.plan[1, :, 4:] == 0).all()


# --------------------------------------------------------------------------------------
# One packaging source of truth


def test_one_minimum_python_everywhere():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = pyproject["project"]["requires-python"]
    assert requires.startswith(">=3.")
    minor = requires.removeprefix(">=3.").split(".")[0]
    assert pyproject["tool"]["ruff"]["target-version"] == f"py3{minor}"
    setup_cfg = ROOT / "setup.cfg"
    assert not setup_cfg.exists() or "[metadata]" not in setup_cfg.read_text()
    assert f"Python 3.{minor}" in (ROOT / "README.md").read_text()
    assert f"Python 3.{minor} or later" in (ROOT / "docs" / "getting_started.md").read_text()
    assert pyproject["project"]["dynamic"] == ["version"]
