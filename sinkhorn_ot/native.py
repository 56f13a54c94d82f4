"""Native (C++ CPU and CUDA) backends: lazy build, availability, and the loop wrapper.

The op ``torch.ops.sinkhorn_ot.solve`` runs the whole Sinkhorn loop of
:func:`sinkhorn_ot._loop.solve_potentials` (same iterates, stopping rule, ``n_iter`` and
``err``) in one call. It lives in two extensions built with
:func:`torch.utils.cpp_extension.load` (ninja) into the torch extensions cache, on
first use or ahead of time with ``python -m sinkhorn_ot build``:

* ``sinkhorn_ot_cpu``: ``csrc/sinkhorn.cpp`` (the op schema) and ``csrc/cpu/*.cpp``;
* ``sinkhorn_ot_cuda``: ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp`` for sm_80 and sm_90,
  built only where torch has CUDA and ``nvcc`` exists, loaded after the CPU library.

A build that fails makes :func:`availability` report why, with one
:class:`NativeBuildWarning` per backend and process; ``backend="auto"`` then uses the
torch backend. ``SINKHORN_OT_NATIVE=0`` turns the native backends off.

Example:
    >>> import torch
    >>> from sinkhorn_ot import native
    >>> ok, reason = native.availability(torch.device("cpu"), torch.float64)
    >>> isinstance(ok, bool) and isinstance(reason, str)
    True
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import threading
import warnings
from pathlib import Path

import torch

from ._loop import _raise_non_finite, eps_schedule

__all__ = [
    "NativeBuildWarning",
    "availability",
    "build",
    "cpu_compile_flags",
    "cpu_sources",
    "enabled",
    "info_lines",
    "solve_potentials",
]

CSRC = Path(__file__).resolve().parent / "csrc"
ENV_SWITCH = "SINKHORN_OT_NATIVE"
METHOD_CODES = {"log": 0, "kernel": 1}
_DTYPES = (torch.float32, torch.float64)
#: CUDA architectures of the CUDA extension (A100 and H100 class).
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


class NativeBuildWarning(RuntimeWarning):
    """A native extension failed to build or load; the torch backend is used instead."""


def enabled() -> bool:
    """Whether native backends may be used (``SINKHORN_OT_NATIVE`` is not ``0``).

    Example:
        >>> import os
        >>> from sinkhorn_ot import native
        >>> native.enabled() == (os.environ.get("SINKHORN_OT_NATIVE", "1").strip() != "0")
        True
    """
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def cpu_compile_flags() -> list[str]:
    """Compiler flags of the CPU extension for this machine.

    ``-O3`` always; ATen's AVX2 ``Vectorized`` (and ``-mavx2 -mfma``) where torch itself
    dispatches to AVX2 or AVX512 kernels on this CPU, ATen's generic vectors otherwise
    (so the build never emits instructions the CPU lacks).

    Example:
        >>> from sinkhorn_ot import native
        >>> native.cpu_compile_flags()[0]
        '-O3'
    """
    flags = ["-O3"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    capability = torch.backends.cpu.get_cpu_capability()
    if x86 and capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


class _Extension:
    """One lazily built extension: built and loaded at most once per process."""

    def __init__(self, label: str):
        self.label = label
        self.error: str | None = None  # why it is unavailable, once known
        self.path: str | None = None
        self.warned = False
        self.lock = threading.Lock()

    def load(self, builder, *, verbose: bool = False, warn: bool = True) -> bool:
        with self.lock:
            if self.path is None and self.error is None:
                try:
                    self.path = builder(verbose)
                except Exception as exc:  # a compiler error, a missing toolchain, ...
                    self.error = _summarise(exc)
            if self.error is not None and warn and not self.warned:
                self.warned = True
                warnings.warn(
                    f"sinkhorn_ot: the {self.label} backend is unavailable, falling back to "
                    f"the torch backend: {self.error}. Run `python -m sinkhorn_ot build` to "
                    f"see the full build log, or set {ENV_SWITCH}=0 to silence this.",
                    NativeBuildWarning,
                    stacklevel=5,
                )
            return self.path is not None


_CPU = _Extension("native-cpu")
_CUDA = _Extension("native-cuda")
_FAKE_REGISTERED = False


def _summarise(exc: BaseException) -> str:
    """A one-line reason: the first compiler error if there is one, else the message."""
    text = str(exc)
    for line in text.splitlines():
        if re.search(r"\berror\s*:", line, flags=re.IGNORECASE):
            return f"{type(exc).__name__}: {line.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def cpu_sources() -> list[str]:
    """Sources of the CPU extension: the op schema and ``csrc/cpu/*.cpp``.

    Example:
        >>> import os
        >>> from sinkhorn_ot import native
        >>> sources = native.cpu_sources()
        >>> os.path.basename(sources[0]), all(os.path.isfile(p) for p in sources)
        ('sinkhorn.cpp', True)
    """
    return [str(CSRC / "sinkhorn.cpp"), *sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))]


def _build_cpu(verbose: bool) -> str:
    from torch.utils import cpp_extension

    path = cpp_extension.load(
        name="sinkhorn_ot_cpu",
        sources=cpu_sources(),
        extra_cflags=cpu_compile_flags(),
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=verbose,
    )
    _register_fake()
    return path


def _cuda_home() -> str | None:
    """The CUDA toolkit root (with ``bin/nvcc`` and ``include/cuda_runtime.h``).

    torch guesses it from the ``nvcc`` on ``PATH``, which fails when that ``nvcc`` is a
    wrapper script outside the toolkit (``/usr/local/bin/nvcc`` here); so the usual
    places are tried too, and the one found is handed to ``cpp_extension``.
    """
    from torch.utils import cpp_extension

    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        cpp_extension.CUDA_HOME,
        "/usr/local/cuda",
    ]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            if (Path(home) / "bin" / "nvcc").is_file():
                cpp_extension.CUDA_HOME = home
                return home
    return None


def _cuda_toolchain_missing() -> str | None:
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if _cuda_home() is None:
        return "no CUDA toolkit found (nvcc and cuda_runtime.h; set CUDA_HOME)"
    if not any((CSRC / "cuda").glob("*.cu")):
        return f"no CUDA sources in {CSRC / 'cuda'}"
    return None


def _build_cuda(verbose: bool) -> str:
    missing = _cuda_toolchain_missing()
    if missing is not None:
        raise RuntimeError(missing)
    if not _CPU.load(_build_cpu, verbose=verbose, warn=False):
        raise RuntimeError(f"the CPU library (which declares the op) is unavailable: {_CPU.error}")
    from torch.utils import cpp_extension

    cuda_dir = CSRC / "cuda"
    sources = sorted(str(p) for p in cuda_dir.glob("*.cu"))
    sources += sorted(str(p) for p in cuda_dir.glob("*.cpp"))
    return cpp_extension.load(
        name="sinkhorn_ot_cuda",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", *CUDA_ARCH_FLAGS],
        extra_include_paths=[str(CSRC), str(cuda_dir)],
        is_python_module=False,
        verbose=verbose,
    )


def _register_fake() -> None:
    """Shape/dtype propagation of the op, so torch.compile and FakeTensor can trace it."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    @torch.library.register_fake("sinkhorn_ot::solve")
    def _solve_fake(C, a, b, eps, f0, eps0, anneal_steps, eps_scaling, max_iter, tol, method):
        batch, n, m = C.shape
        return (
            C.new_empty((batch, n)),
            C.new_empty((batch, m)),
            C.new_empty((batch,), dtype=torch.int64),
            C.new_empty((batch,), dtype=torch.float64),
        )

    _FAKE_REGISTERED = True


def availability(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether a native kernel exists for ``device`` and ``dtype``, and if not, why.

    Builds (first call only, which can take a minute) and loads the extension of the
    device type. A failed build is reported once with a :class:`NativeBuildWarning`.

    Args:
        device: where the problem lives (``cpu`` or ``cuda``).
        dtype: compute dtype of the problem.

    Returns:
        ``(True, "ok")`` or ``(False, reason)``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import native
        >>> native.availability("cpu", torch.int64)
        (False, 'native kernels support float32 and float64, not torch.int64')
    """
    device = torch.device(device)
    if dtype not in _DTYPES:
        return False, f"native kernels support float32 and float64, not {dtype}"
    if not enabled():
        return False, f"native backends are disabled by {ENV_SWITCH}=0"
    if device.type == "cpu":
        if _CPU.load(_build_cpu):
            return True, "ok"
        return False, f"native-cpu build failed: {_CPU.error}"
    if device.type == "cuda":
        missing = _cuda_toolchain_missing()
        if missing is not None:
            return False, missing
        if not _CUDA.load(_build_cuda):
            return False, f"native-cuda build failed: {_CUDA.error}"
        return True, "ok"
    return False, f"no native kernels for device type {device.type!r}"


def build(*, cuda: bool | None = None, verbose: bool = True) -> dict[str, str | None]:
    """Build (or load from the cache) the native extensions now.

    Args:
        cuda: build the CUDA extension too; ``None`` = wherever torch has CUDA and
            ``nvcc`` exists.
        verbose: print the compiler commands and output.

    Returns:
        ``{"native-cpu": error or None, "native-cuda": error or None}``; the CUDA entry is
        ``None`` also when it was skipped (see :func:`info_lines`).

    Example:
        >>> from sinkhorn_ot import native
        >>> errors = native.build(cuda=False, verbose=False)  # the CPU extension only
        >>> sorted(errors), errors["native-cuda"]
        (['native-cpu', 'native-cuda'], None)
    """
    errors: dict[str, str | None] = {"native-cpu": None, "native-cuda": None}
    if not _CPU.load(_build_cpu, verbose=verbose, warn=False):
        errors["native-cpu"] = _CPU.error
    if cuda is None:
        cuda = _cuda_toolchain_missing() is None
    if cuda and not _CUDA.load(_build_cuda, verbose=verbose, warn=False):
        errors["native-cuda"] = _CUDA.error
    return errors


def info_lines(*, cuda: bool = True) -> list[str]:
    """One status line per backend, as printed by ``python -m sinkhorn_ot info``.

    Loads (and if needed builds) the native extensions.

    Args:
        cuda: also build/load the CUDA extension; ``False`` reports it as skipped.

    Returns:
        ``["torch: ok", "native-cpu: ...", "native-cuda: ..."]``, each native entry
        ``ok``, ``compiled, no device`` or ``unavailable: <reason>``.

    Example:
        >>> from sinkhorn_ot import native
        >>> for line in native.info_lines(cuda=False):
        ...     print(line)  # doctest: +ELLIPSIS
        torch: ok
        native-cpu: ...
        native-cuda: ...
    """
    lines = ["torch: ok"]
    if not enabled():
        off = f"unavailable: disabled by {ENV_SWITCH}=0"
        return [*lines, f"native-cpu: {off}", f"native-cuda: {off}"]
    if _CPU.load(_build_cpu, warn=False):
        lines.append("native-cpu: ok")
    else:
        lines.append(f"native-cpu: unavailable: {_CPU.error}")
    missing = _cuda_toolchain_missing()
    if missing is not None:
        lines.append(f"native-cuda: unavailable: {missing}")
    elif not cuda and _CUDA.path is None and _CUDA.error is None:
        lines.append("native-cuda: unavailable: not built (skipped)")
    elif not _CUDA.load(_build_cuda, warn=False):
        lines.append(f"native-cuda: unavailable: {_CUDA.error}")
    elif torch.cuda.is_available():
        lines.append("native-cuda: ok")
    else:
        lines.append("native-cuda: compiled, no device")
    return lines


def solve_potentials(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: torch.Tensor,
    f0: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    method: str,
    eps_scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native twin of :func:`sinkhorn_ot._loop.solve_potentials` (same signature, results).

    The whole loop, stopping checks included, runs in one call of
    ``torch.ops.sinkhorn_ot.solve``; no autograd (the solver calls it under ``no_grad``).

    Args:
        C: cost ``(B, N, M)``, float32 or float64.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses; zeros mark padding.
        eps: ``(B,)`` target regularisation.
        f0: ``(B, N)`` initial row potential.
        max_iter: number of (row, column) update pairs at most.
        tol: per-problem tolerance on the relative L1 marginal violation; ``None`` runs
            exactly ``max_iter`` iterations.
        method: ``"log"`` or ``"kernel"``.
        eps_scaling: optional annealing factor in (0, 1), see
            :func:`sinkhorn_ot._loop.eps_schedule`.

    Returns:
        ``f (B, N)``, ``g (B, M)`` (not normalised), ``n_iter (B,)`` int64, ``err (B,)``
        float64.

    Raises:
        KernelUnderflowError: a kernel-form potential became non-finite.
        FloatingPointError: a log-domain potential became non-finite.
        RuntimeError: the native backend is unavailable for this device and dtype.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import native
        >>> C = torch.rand(2, 3, 4, dtype=torch.float64)
        >>> a = torch.full((2, 3), 1 / 3, dtype=torch.float64)
        >>> b = torch.full((2, 4), 1 / 4, dtype=torch.float64)
        >>> eps = torch.full((2,), 0.1, dtype=torch.float64)
        >>> f, g, n_iter, err = native.solve_potentials(
        ...     C, a, b, eps, torch.zeros_like(a), max_iter=500, tol=1e-9, method="log")
        >>> bool((err <= 1e-9).all()), f.shape, g.shape
        (True, torch.Size([2, 3]), torch.Size([2, 4]))
    """
    if method not in METHOD_CODES:
        raise ValueError(f"`method` must be 'log' or 'kernel', got {method!r}")
    ok, reason = availability(C.device, C.dtype)
    if not ok:
        raise RuntimeError(f"the native backend is unavailable: {reason}")
    eps0, anneal_steps = eps_schedule(eps, C, eps_scaling)
    inputs = [t.detach().to(C.dtype).contiguous() for t in (C, a, b, eps, f0, eps0)]
    f, g, n_iter, err = torch.ops.sinkhorn_ot.solve(
        *inputs,
        int(anneal_steps),
        float(eps_scaling) if eps_scaling is not None else 0.0,
        int(max_iter),
        -1.0 if tol is None else float(tol),
        METHOD_CODES[method],
    )
    finite = torch.isfinite(err).all() & torch.isfinite(f).all() & torch.isfinite(g).all()
    if not bool(finite):
        _raise_non_finite(method)
    return f, g, n_iter, err
