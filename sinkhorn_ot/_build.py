"""Building and loading the native extensions, and whether they are available.

The ops ``torch.ops.sinkhorn_ot.solve`` (a dense cost) and ``solve_points`` (point
clouds) run the whole Sinkhorn loop of :func:`sinkhorn_ot._loop.solve_potentials` in
one call (their Python wrappers are in :mod:`sinkhorn_ot.ops`). They live in two
extensions built with :func:`torch.utils.cpp_extension.load` (ninja), on first use or
ahead of time with ``python -m sinkhorn_ot build``:

* ``sinkhorn_ot_cpu``: ``csrc/sinkhorn.cpp`` (the op schemas) and ``csrc/cpu/*.cpp``;
* ``sinkhorn_ot_cuda``: ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp`` for sm_80 and sm_90,
  built only where torch has CUDA and ``nvcc`` exists, loaded after the CPU library.

Each extension is built in its own folder of the torch extensions cache,
``<root>/<name>_<key>``, where ``key`` hashes everything the library depends on: the
contents of its sources and headers, the compile flags, torch's version, CUDA version and
location, the Python ABI and the package's location (:func:`build_key`). Two checkouts,
two virtual environments or two torch versions therefore never share (and rebuild) one
build. A finished build leaves a marker file naming its library; a later process that
finds the marker loads the library with :func:`torch.ops.load_library` without importing
:mod:`torch.utils.cpp_extension` or running ninja. A build that starts prints one line to
stderr saying what it builds and roughly how long it takes.

A build that fails makes :func:`availability` report why, with one
:class:`~sinkhorn_ot.errors.NativeBuildWarning` per backend and process;
``backend="auto"`` then uses the torch backend. ``SINKHORN_OT_NATIVE=0`` turns the
native backends off. The public names are re-exported by :mod:`sinkhorn_ot.native`.

Example:
    >>> import torch
    >>> from sinkhorn_ot import _build
    >>> ok, reason = _build.availability(torch.device("cpu"), torch.float64)
    >>> isinstance(ok, bool) and isinstance(reason, str)
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch

from .errors import NativeBuildWarning

__all__ = [
    "CSRC",
    "CUDA_ARCH_FLAGS",
    "ENV_SWITCH",
    "NativeBuildWarning",
    "availability",
    "build",
    "build_directory",
    "build_key",
    "cpu_compile_flags",
    "cpu_sources",
    "enabled",
    "extensions_root",
    "info_lines",
]

CSRC = Path(__file__).resolve().parent / "csrc"
ENV_SWITCH = "SINKHORN_OT_NATIVE"
#: The file a finished build leaves in its folder: the build key and the library's name.
MARKER = "sinkhorn_ot_build.json"
#: Bumped when the build recipe changes in a way the key does not see.
_RECIPE_VERSION = 1
_DTYPES = (torch.float32, torch.float64)
#: CUDA architectures of the CUDA extension (A100 and H100 class).
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


def enabled() -> bool:
    """Whether native backends may be used (``SINKHORN_OT_NATIVE`` is not ``0``).

    Example:
        >>> import os
        >>> from sinkhorn_ot import native  # the public facade of this module
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


def _cpu_spec() -> dict:
    return {
        "name": "sinkhorn_ot_cpu",
        "what": "the native CPU kernels",
        "duration": "about a minute",
        "sources": cpu_sources(),
        "depends": _files(CSRC, "*.cpp", "*.h") + _files(CSRC / "cpu", "*.cpp", "*.h"),
        "extra_cflags": cpu_compile_flags(),
        "extra_include_paths": [str(CSRC)],
    }


def _cuda_spec(cuda_home: str) -> dict:
    cuda_dir = CSRC / "cuda"
    sources = sorted(str(p) for p in cuda_dir.glob("*.cu"))
    sources += sorted(str(p) for p in cuda_dir.glob("*.cpp"))
    return {
        "name": "sinkhorn_ot_cuda",
        "what": "the native CUDA kernels (nvcc, sm_80 and sm_90)",
        "duration": "several minutes",
        "sources": sources,
        "depends": _files(CSRC, "*.cpp", "*.h") + _files(cuda_dir, "*.cu", "*.cuh", "*.cpp", "*.h"),
        "extra_cflags": ["-O3"],
        "extra_cuda_cflags": ["-O3", *CUDA_ARCH_FLAGS],
        "extra_include_paths": [str(CSRC), str(cuda_dir)],
        "cuda_home": cuda_home,
    }


def _files(folder: Path, *patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def extensions_root() -> Path:
    """The folder the build folders live in: ``$TORCH_EXTENSIONS_DIR`` if set, else
    torch's default extensions cache (``~/.cache/torch_extensions/py<ver>_<cpu|cuXXX>``),
    found without importing :mod:`torch.utils.cpp_extension`."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch import _appdirs

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    base = os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
    return Path(base) / f"{python}_{accelerator}"


def build_key(spec: dict) -> str:
    """A hash of everything a build depends on (hex, 16 characters).

    The contents of the sources and of the headers next to them, the compile flags and
    include paths, the compiler (``$CXX``), torch's version, git revision, CUDA version
    and location, the Python version, ABI and environment (``sys.prefix``), the machine,
    and the package's own location (so two checkouts never share a build folder).
    """
    digest = hashlib.sha256()

    def add(value: object) -> None:
        digest.update(repr(value).encode())
        digest.update(b"\0")

    for part in (
        _RECIPE_VERSION,
        spec["name"],
        spec["sources"],
        spec.get("extra_cflags"),
        spec.get("extra_cuda_cflags"),
        spec.get("extra_include_paths"),
        spec.get("cuda_home"),
        os.environ.get("CXX", ""),
        torch.__version__,
        torch.version.git_version,
        torch.version.cuda,
        str(Path(torch.__file__).resolve().parent),
        sys.version,
        sysconfig.get_config_var("EXT_SUFFIX"),
        sys.prefix,
        platform.machine(),
        str(CSRC),
    ):
        add(part)
    for path in spec["depends"]:
        add(str(path.relative_to(CSRC)))
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_directory(which: str = "cpu") -> Path:
    """The build folder of the ``"cpu"`` or ``"cuda"`` extension for this install.

    Example:
        >>> from sinkhorn_ot import native
        >>> native.build_directory("cpu").name.startswith("sinkhorn_ot_cpu_")
        True
    """
    if which == "cpu":
        spec = _cpu_spec()
    elif which == "cuda":
        spec = _cuda_spec(_cuda_home() or "")
    else:
        raise ValueError(f"`which` must be 'cpu' or 'cuda', got {which!r}")
    return extensions_root() / f"{spec['name']}_{build_key(spec)}"


#: How each extension was obtained in this process: ``"cached"`` (loaded from a finished
#: build) or ``"compiled"`` (cpp_extension.load ran); keyed by extension name.
LOADED: dict[str, str] = {}


def _cached_library(directory: Path, key: str) -> str | None:
    """The library of a finished build in ``directory`` with this key, if there is one."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    library = directory / str(marker.get("library", ""))
    if marker.get("key") != key or not library.is_file():
        return None
    return str(library)


def _write_marker(directory: Path, key: str, library: str, seconds: float) -> None:
    record = {"key": key, "library": Path(library).name, "build_seconds": round(seconds, 1)}
    tmp = directory / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, directory / MARKER)  # atomic: readers see no marker or a whole one


class _QuietCudaHome(logging.Filter):
    """Drops cpp_extension's ``No CUDA runtime is found, using CUDA_HOME=...`` (logged at
    import on any machine without a GPU); we find the toolkit ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension():
    """:mod:`torch.utils.cpp_extension`, imported without its CUDA_HOME warning."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _QuietCudaHome()
    logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def _load(spec: dict, verbose: bool) -> str:
    """Load the extension of ``spec`` from its build folder, building it first if needed."""
    key = build_key(spec)
    directory = extensions_root() / f"{spec['name']}_{key}"
    library = _cached_library(directory, key)
    if library is None:
        directory.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock  # a torch dependency

        # One builder per folder; a process that waited finds the marker and just loads.
        with FileLock(str(directory / "sinkhorn_ot.lock")):
            library = _cached_library(directory, key)
            if library is None:
                library = _compile(spec, directory, key, verbose)
                LOADED[spec["name"]] = "compiled"
                return library
    torch.ops.load_library(library)
    LOADED[spec["name"]] = "cached"
    return library


def _compile(spec: dict, directory: Path, key: str, verbose: bool) -> str:
    print(
        f"sinkhorn_ot: building {spec['what']} ({spec['name']}) once for this install, "
        f"{spec['duration']}, in {directory}",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    cpp_extension = _cpp_extension()
    kwargs = {k: spec[k] for k in ("extra_cflags", "extra_cuda_cflags") if k in spec}
    if "cuda_home" in spec:
        cpp_extension.CUDA_HOME = spec["cuda_home"]
    library = cpp_extension.load(
        name=spec["name"],
        sources=spec["sources"],
        extra_include_paths=spec["extra_include_paths"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
        **kwargs,
    )
    _write_marker(directory, key, library, time.monotonic() - start)
    return library


def _build_cpu(verbose: bool) -> str:
    path = _load(_cpu_spec(), verbose)
    _register_fake()
    return path


def _cuda_home() -> str | None:
    """The CUDA toolkit root (with ``bin/nvcc`` and ``include/cuda_runtime.h``).

    torch guesses it from the ``nvcc`` on ``PATH``, which fails when that ``nvcc`` is a
    wrapper script outside the toolkit (``/usr/local/bin/nvcc`` here); so the usual
    places are tried too, and the one found is handed to ``cpp_extension`` when the
    CUDA extension is built. Found without importing :mod:`torch.utils.cpp_extension`.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).parent.parent))  # what torch guesses
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            if (Path(home) / "bin" / "nvcc").is_file():
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
    return _load(_cuda_spec(_cuda_home()), verbose)


def _register_fake() -> None:
    """Fake (meta) implementations of the ops, once the library that declares them is loaded."""
    from . import ops

    ops.register_fakes()


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
