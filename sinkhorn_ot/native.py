"""Native (C++ CPU and CUDA) backends: the public facade.

The ops ``torch.ops.sinkhorn_ot.solve`` (a dense cost ``C``) and
``torch.ops.sinkhorn_ot.solve_points`` (point clouds, the cost computed on the fly) run
the whole Sinkhorn loop of :func:`sinkhorn_ot._loop.solve_potentials` (same iterates,
stopping rule, ``n_iter`` and ``err``) in one call. The code is split like PyTorch's
extension-cpp example:

* :mod:`sinkhorn_ot._build`: toolchain discovery, the lazy build with
  :func:`torch.utils.cpp_extension.load`, :func:`availability`, :func:`build`,
  :func:`info_lines` (re-exported here);
* :mod:`sinkhorn_ot.ops`: the Python wrappers of the ops
  (:func:`~sinkhorn_ot.ops.solve_dense`, :func:`~sinkhorn_ot.ops.solve_points`), their
  input checks and fake (meta) implementations;
* :mod:`sinkhorn_ot.errors`: the exceptions and warnings.

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

import torch

from ._build import CSRC as CSRC  # not public, kept importable here (tests, tools)
from ._build import CUDA_ARCH_FLAGS as CUDA_ARCH_FLAGS
from ._build import ENV_SWITCH as ENV_SWITCH
from ._build import (
    availability,
    build,
    build_directory,
    cpu_compile_flags,
    cpu_sources,
    enabled,
    info_lines,
)
from ._loop import eps_table
from .errors import NativeBuildWarning

__all__ = [
    "NativeBuildWarning",
    "availability",
    "build",
    "build_directory",
    "cpu_compile_flags",
    "cpu_sources",
    "enabled",
    "info_lines",
    "solve_potentials",
]


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

    Kept for the solver; it builds the eps table with :func:`sinkhorn_ot._loop.eps_table`
    (cost scale ``max |C_ij|``) and calls :func:`sinkhorn_ot.ops.solve_dense`, which runs
    the whole loop, stopping checks included, in one call of ``torch.ops.sinkhorn_ot.solve``;
    no autograd (the solver calls it under ``no_grad``). ``a``, ``b``, ``eps`` and ``f0``
    are cast to the dtype of ``C``.

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
            :func:`sinkhorn_ot._loop.eps_table`.

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
    from . import ops

    ops.check_method(method)
    if eps_scaling is None:
        table = eps_table(eps, eps, None)
    else:
        table = eps_table(eps, C.detach().abs().amax(dim=(1, 2)), eps_scaling)
    dtype = C.dtype
    return ops.solve_dense(
        C,
        a.to(dtype),
        b.to(dtype),
        f0.to(dtype),
        table.to(dtype),
        max_iter=max_iter,
        tol=tol,
        method=method,
    )
