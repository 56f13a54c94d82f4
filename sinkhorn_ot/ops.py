"""Python wrappers of the native ops, their input checks and fake implementations.

* :func:`solve_dense` wraps ``torch.ops.sinkhorn_ot.solve``: a dense cost ``C (B, N, M)``.
* :func:`solve_points` wraps ``torch.ops.sinkhorn_ot.solve_points``: point clouds
  ``x (B, N, D)``, ``y (B, M, D)``; the cost ``cost_scale * c(x_i, y_j)`` is computed on
  the fly and nothing of size ``N * M`` is stored.
* :func:`point_softmin` wraps ``torch.ops.sinkhorn_ot.point_softmin``: one row
  soft-min of point clouds, the half-step of loops the ops do not run (the symmetric
  updates of :func:`sinkhorn_ot.sinkhorn_divergence`).

The two solves run the whole loop of :func:`sinkhorn_ot._loop.solve_potentials` (same iterates,
stopping rule, ``n_iter`` and ``err``; contract in ``csrc/loop_rules.h``) in one call,
with the eps schedule given as a table ``eps_table (B, S)`` (iteration ``t`` uses column
``min(t, S - 1)``; :func:`sinkhorn_ot._loop.eps_table` builds it). The ops are declared
in ``csrc/sinkhorn.cpp``; the fake (meta) implementations registered here let
``torch.compile`` and FakeTensor trace them. The wrappers check their inputs in Python
(``ValueError`` for shapes, names and devices, ``TypeError`` for dtypes), build the
extension if needed (:func:`sinkhorn_ot.native.availability`) and raise like the torch
loop when a potential is not finite. No autograd: the results are detached.

Example:
    >>> import torch
    >>> from sinkhorn_ot import ops
    >>> x, y = torch.rand(1, 5, 2, dtype=torch.float64), torch.rand(1, 6, 2, dtype=torch.float64)
    >>> a, b = torch.full((1, 5), 0.2, dtype=torch.float64), torch.full((1, 6), 1 / 6, dtype=torch.float64)
    >>> eps = torch.full((1, 1), 0.05, dtype=torch.float64)
    >>> f, g, n_iter, err = ops.solve_points(
    ...     x, y, a, b, torch.zeros_like(a), eps, max_iter=1000, tol=1e-9, method="log",
    ...     cost="sqeuclidean", cost_scale=1.0)
    >>> bool(err[0] <= 1e-9)
    True
"""

from __future__ import annotations

import math

import torch

from . import _build
from .errors import raise_non_finite

__all__ = [
    "COSTS",
    "METHODS",
    "check_method",
    "point_softmin",
    "register_fakes",
    "solve_dense",
    "solve_points",
]

#: The ``method`` values of the ops. ``"stabilised"`` computes the log-domain iterates by
#: the stabilised kernel form on the CPU for a dense cost (``csrc/cpu/stabilised.h``);
#: point clouds and CUDA run the log-domain kernels for it.
METHODS = ("log", "kernel", "stabilised")
#: The ``cost`` values of :func:`solve_points`.
COSTS = ("sqeuclidean", "euclidean", "cosine")
_DTYPES = (torch.float32, torch.float64)
_FAKES_REGISTERED = False

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is ``"log"``, ``"kernel"`` or ``"stabilised"``.

    Example:
        >>> from sinkhorn_ot.ops import check_method
        >>> check_method("log")
        >>> check_method("auto")
        Traceback (most recent call last):
        ...
        ValueError: `method` must be 'log', 'kernel' or 'stabilised', got 'auto'
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be 'log', 'kernel' or 'stabilised', got {method!r}")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t, shape: tuple[int, ...], ref: torch.Tensor, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor, got {type(t).__name__}")
    if _shape(t) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {_shape(t)}")
    if t.dtype != ref.dtype:
        raise TypeError(
            f"`{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {t.dtype}"
        )
    if t.device != ref.device:
        raise ValueError(
            f"`{name}` must be on the device of `{ref_name}` ({ref.device}), got {t.device}"
        )


def _check_leading(name: str, t, dims: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"`{name}` must have shape {dims}, got {got}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"`{name}` must be float32 or float64, got {t.dtype}")


#: The ``stop`` values of the ops (csrc/loop_rules.h).
STOPS = ("marginals", "potentials")


def _check_relaxation(ref, ref_name, batch, rho, stop) -> None:
    if rho is not None:
        _check_tensor("rho", rho, (batch, 2), ref, ref_name)
    if stop not in STOPS:
        raise ValueError(f"`stop` must be 'marginals' or 'potentials', got {stop!r}")


def _check_common(ref, ref_name, batch, n, m, a, b, f0, eps_table, max_iter, tol, method) -> None:
    _check_tensor("a", a, (batch, n), ref, ref_name)
    _check_tensor("b", b, (batch, m), ref, ref_name)
    _check_tensor("f0", f0, (batch, n), ref, ref_name)
    if not isinstance(eps_table, torch.Tensor) or eps_table.dim() != 2:
        got = _shape(eps_table) if isinstance(eps_table, torch.Tensor) else type(eps_table).__name__
        raise ValueError(f"`eps_table` must have shape (B, S) = ({batch}, S), got {got}")
    if eps_table.shape[0] != batch or eps_table.shape[1] < 1:
        raise ValueError(
            f"`eps_table` must have shape (B, S) = ({batch}, S) with S >= 1, got "
            f"{_shape(eps_table)}"
        )
    _check_tensor("eps_table", eps_table, _shape(eps_table), ref, ref_name)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"`max_iter` must be an int >= 0, got {max_iter!r}")
    if tol is not None and (not isinstance(tol, (int, float)) or math.isnan(tol)):
        raise ValueError(f"`tol` must be a float or None, got {tol!r}")
    check_method(method)


def _check_dense(C, a, b, f0, eps_table, max_iter, tol, method, rho=None, stop="marginals"):
    _check_leading("C", C, "(B, N, M)")
    batch, n, m = C.shape
    _check_common(C, "C", batch, n, m, a, b, f0, eps_table, max_iter, tol, method)
    _check_relaxation(C, "C", batch, rho, stop)


def _check_points(
    x, y, a, b, f0, eps_table, max_iter, tol, method, cost, cost_scale, rho=None, stop="marginals"
) -> None:
    _check_clouds(x, y)
    batch, n, _ = x.shape
    _check_common(x, "x", batch, n, y.shape[1], a, b, f0, eps_table, max_iter, tol, method)
    _check_cost(cost, cost_scale)
    _check_relaxation(x, "x", batch, rho, stop)


def _check_clouds(x, y) -> None:
    """``x (B, N, D)`` float32/float64, ``y (B, M, D)`` with its dtype and device."""
    _check_leading("x", x, "(B, N, D)")
    batch, _, d = x.shape
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != batch or y.shape[2] != d:
        got = _shape(y) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"`y` must have shape (B, M, D) = ({batch}, M, {d}), got {got}")
    _check_tensor("y", y, _shape(y), x, "x")


def _check_cost(cost, cost_scale) -> None:
    if cost not in COSTS:
        raise ValueError(f"`cost` must be one of {', '.join(map(repr, COSTS))}, got {cost!r}")
    if not isinstance(cost_scale, (int, float)) or not math.isfinite(cost_scale):
        raise ValueError(f"`cost_scale` must be a finite float, got {cost_scale!r}")


def _check_softmin(x, y, h, eps, cost, cost_scale, row_lengths=None) -> None:
    _check_clouds(x, y)
    batch = x.shape[0]
    if y.shape[1] < 1:
        raise ValueError(f"`y` must have at least one point, got shape {_shape(y)}")
    _check_tensor("h", h, (batch, y.shape[1]), x, "x")
    _check_tensor("eps", eps, (batch,), x, "x")
    _check_cost(cost, cost_scale)
    if row_lengths is None:
        return
    if not isinstance(row_lengths, torch.Tensor) or row_lengths.dtype != torch.int64:
        got = (
            row_lengths.dtype
            if isinstance(row_lengths, torch.Tensor)
            else type(row_lengths).__name__
        )
        raise TypeError(f"`row_lengths` must be an int64 tensor, got {got}")
    if tuple(row_lengths.shape) != (batch,) or row_lengths.device != x.device:
        raise ValueError(
            f"`row_lengths` must have shape ({batch},) on the device of `x` ({x.device}), got "
            f"{_shape(row_lengths)} on {row_lengths.device}"
        )


def _require(device: torch.device, dtype: torch.dtype) -> None:
    ok, reason = _build.availability(device, dtype)
    if not ok:
        raise RuntimeError(f"the native backend is unavailable: {reason}")


def _finish(out: Outputs, method: str, check_finite: bool) -> Outputs:
    if not check_finite:
        return out
    f, g, _, err = out
    finite = torch.isfinite(err).all() & torch.isfinite(f).all() & torch.isfinite(g).all()
    if not bool(finite):
        raise_non_finite(method)
    return out


def _momentum_args(momentum: float | str) -> tuple[float, bool]:
    """The ops' ``(momentum, momentum_auto)`` of ``1.0``, a factor or ``"auto"``."""
    if momentum == "auto":
        return 1.0, True
    if isinstance(momentum, str):
        raise ValueError(f"`momentum` must be a float in (0, 2) or 'auto', got {momentum!r}")
    return float(momentum), False


def _prepared(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().contiguous() for t in tensors]


def solve_dense(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f0: torch.Tensor,
    eps_table: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    method: str,
    rho: torch.Tensor | None = None,
    stop: str = "marginals",
    check_finite: bool = True,
    momentum: float | str = 1.0,
) -> Outputs:
    """Sinkhorn potentials of a dense cost, the whole loop in one native call.

    Args:
        C: cost ``(B, N, M)``, float32 or float64.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses, dtype of ``C``; zeros
            mark padding.
        f0: ``(B, N)`` initial row potential.
        eps_table: ``(B, S)``, ``S >= 1``: iteration ``t`` uses column ``min(t, S - 1)``
            (``S = 1``: no annealing); see :func:`sinkhorn_ot._loop.eps_table`.
        max_iter: number of (row, column) update pairs at most.
        tol: per-problem tolerance on the relative L1 marginal violation, checked once
            the annealing is over; ``None`` runs exactly ``max_iter`` iterations.
        method: ``"log"``, ``"kernel"`` or ``"stabilised"`` (the log-domain iterates
            at kernel-form speed, one more ``(N, M)`` buffer per thread).
        rho: ``(B, 2)`` relaxation ``(rho_a, rho_b)`` per problem (``inf`` = hard
            marginal), dtype of ``C``, or ``None`` (balanced): damps the half-steps by
            ``rho / (rho + eps)`` (docs/unbalanced.md).
        stop: ``"marginals"`` or ``"potentials"``: the stopping rule of balanced
            problems (problems with a relaxed side always stop on their potentials).
        momentum: ``1.0``, a factor in (0, 2) or ``"auto"``: over-relaxation from the
            target eps on (``csrc/loop_rules.h``; balanced problems, marginals rule,
            ``"log"``/``"kernel"``; CPU only).
        check_finite: raise if a potential came out non-finite (one host sync). The
            solver skips it only for ``method="log"`` with ``tol=None``: log-domain
            updates of validated input stay finite, and the caller asked for no checks.

    Returns:
        ``f (B, N)``, ``g (B, M)`` in the dtype of ``C`` (not normalised), ``n_iter (B,)``
        int64, ``err (B,)`` float64: as :func:`sinkhorn_ot._loop.solve_potentials`.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or arguments.
        RuntimeError: the native backend is unavailable for this device and dtype.
        KernelUnderflowError: a kernel-form potential became non-finite.
        FloatingPointError: a log-domain potential became non-finite.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import ops
        >>> C = torch.rand(2, 3, 4, dtype=torch.float64)
        >>> a = torch.full((2, 3), 1 / 3, dtype=torch.float64)
        >>> b = torch.full((2, 4), 1 / 4, dtype=torch.float64)
        >>> table = torch.tensor([[0.4, 0.2, 0.1], [0.1, 0.1, 0.1]], dtype=torch.float64)
        >>> f, g, n_iter, err = ops.solve_dense(
        ...     C, a, b, torch.zeros_like(a), table, max_iter=500, tol=1e-9, method="log")
        >>> bool((err <= 1e-9).all()), f.shape, g.shape, n_iter.dtype
        (True, torch.Size([2, 3]), torch.Size([2, 4]), torch.int64)
    """
    _check_dense(C, a, b, f0, eps_table, max_iter, tol, method, rho, stop)
    _require(C.device, C.dtype)
    out = torch.ops.sinkhorn_ot.solve(
        *_prepared(C, a, b, f0, eps_table),
        int(max_iter),
        None if tol is None else float(tol),
        method,
        None if rho is None else rho.detach().contiguous(),
        stop,
        *_momentum_args(momentum),
    )
    return _finish(out, method, check_finite)


def solve_points(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f0: torch.Tensor,
    eps_table: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None,
    method: str,
    cost: str,
    cost_scale: float,
    rho: torch.Tensor | None = None,
    stop: str = "marginals",
    check_finite: bool = True,
    momentum: float | str = 1.0,
) -> Outputs:
    """Sinkhorn potentials between point clouds, the cost computed on the fly.

    Same loop and results as :func:`solve_dense` on the dense cost
    ``C = cost_scale * c(x_i, y_j)`` (for instance ``cost_scale *
    sinkhorn_ot.costs.sqeuclidean(x, y)``), with memory ``O((N + M) D)``: nothing of
    size ``N * M`` is stored.

    Args:
        x: ``(B, N, D)`` row points, float32 or float64.
        y: ``(B, M, D)`` column points, dtype of ``x``.
        a, b: weights ``(B, N)``, ``(B, M)`` with equal masses; zeros mark padding.
        f0: ``(B, N)`` initial row potential.
        eps_table: ``(B, S)``, iteration ``t`` uses column ``min(t, S - 1)``.
        max_iter: number of (row, column) update pairs at most.
        tol: tolerance on the relative L1 marginal violation; ``None``: exactly
            ``max_iter`` iterations.
        method: ``"log"`` or ``"kernel"`` (``exp(-C / eps)`` without a shift: it
            underflows like the dense kernel form); ``"stabilised"`` runs ``"log"`` here
            (it would store an ``N x M`` kernel).
        cost: ``"sqeuclidean"`` (``|x - y|^2``), ``"euclidean"`` (``|x - y|``) or
            ``"cosine"`` (``1 - <x, y> / (|x| |y|)``, norms floored at ``1e-8``).
        cost_scale: factor applied to the cost.
        rho, stop, momentum: the relaxation, stopping rule and momentum, as for
            :func:`solve_dense`.
        check_finite: as in :func:`solve_dense`.

    Returns:
        ``f (B, N)``, ``g (B, M)`` (not normalised), ``n_iter (B,)`` int64, ``err (B,)``
        float64.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or arguments.
        RuntimeError: the native backend is unavailable for this device and dtype.
        KernelUnderflowError: a kernel-form potential became non-finite.
        FloatingPointError: a log-domain potential became non-finite.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import ops
        >>> from sinkhorn_ot.costs import sqeuclidean
        >>> x, y = torch.rand(2, 7, 3, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
        >>> a = torch.full((2, 7), 1 / 7, dtype=torch.float64)
        >>> b = torch.full((2, 5), 1 / 5, dtype=torch.float64)
        >>> table = torch.full((2, 1), 0.1, dtype=torch.float64)
        >>> kw = dict(max_iter=50, tol=None, method="log")
        >>> pts = ops.solve_points(x, y, a, b, torch.zeros_like(a), table, **kw,
        ...                        cost="sqeuclidean", cost_scale=2.0)
        >>> dense = ops.solve_dense(2.0 * sqeuclidean(x, y), a, b, torch.zeros_like(a), table, **kw)
        >>> torch.allclose(pts[0], dense[0], rtol=0, atol=1e-12), pts[2].tolist()
        (True, [50, 50])
    """
    _check_points(x, y, a, b, f0, eps_table, max_iter, tol, method, cost, cost_scale, rho, stop)
    _require(x.device, x.dtype)
    out = torch.ops.sinkhorn_ot.solve_points(
        *_prepared(x, y, a, b, f0, eps_table),
        int(max_iter),
        None if tol is None else float(tol),
        method,
        cost,
        float(cost_scale),
        None if rho is None else rho.detach().contiguous(),
        stop,
        *_momentum_args(momentum),
    )
    return _finish(out, method, check_finite)


def point_softmin(
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    eps: torch.Tensor,
    *,
    cost: str,
    cost_scale: float,
    row_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row soft-min of point clouds, the cost computed on the fly (CPU or CUDA).

    ``out[k, i] = -eps[k] log sum_j exp((h[k, j] - cost_scale * c(x[k, i], y[k, j])) /
    eps[k])``, by the max-rescaled log-sum-exp of :func:`solve_points` (on CUDA: its row
    pass); memory ``O((N + M) D)``. No autograd (the inputs are detached).

    Args:
        x: ``(B, N, D)`` points whose soft-min is computed, float32 or float64.
        y: ``(B, M, D)`` points summed over, ``M >= 1``, dtype of ``x``.
        h: ``(B, M)``: a potential plus ``eps`` times the log of its weights (``-inf``
            drops a point; a row whose every ``h`` is ``-inf`` gets ``+inf``).
        eps: ``(B,)`` positive temperatures.
        cost, cost_scale: as in :func:`solve_points`.
        row_lengths: ``None`` or ``(B,)`` int64 in ``[0, N]``: rows ``i >=
            row_lengths[k]`` are padding, not computed, and set to 0. (Trailing points
            of ``y`` that ``h`` drops are left out of the sums either way, so a padded
            ragged batch costs only its real pairs on the CPU.)

    Returns:
        ``(B, N)`` in the dtype of ``x``.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import ops
        >>> from sinkhorn_ot.costs import sqeuclidean
        >>> x, y = torch.rand(2, 7, 3, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
        >>> h, eps = torch.randn(2, 5, dtype=torch.float64), torch.tensor([0.1, 0.3], dtype=torch.float64)
        >>> out = ops.point_softmin(x, y, h, eps, cost="sqeuclidean", cost_scale=0.5)
        >>> C = 0.5 * sqeuclidean(x, y)
        >>> e = eps.view(2, 1, 1)
        >>> want = -eps.view(2, 1) * torch.logsumexp((h.unsqueeze(1) - C) / e, dim=2)
        >>> torch.allclose(out, want, rtol=1e-13, atol=0)
        True
        >>> short = ops.point_softmin(x, y, h, eps, cost="sqeuclidean", cost_scale=0.5,
        ...                           row_lengths=torch.tensor([7, 4]))
        >>> torch.equal(short[1, 4:], torch.zeros(3, dtype=torch.float64)), torch.equal(short[:, :4], out[:, :4])
        (True, True)
    """
    _check_softmin(x, y, h, eps, cost, cost_scale, row_lengths)
    _require(x.device, x.dtype)
    lengths = None if row_lengths is None else row_lengths.detach().contiguous()
    return torch.ops.sinkhorn_ot.point_softmin(
        *_prepared(x, y, h, eps), cost, float(cost_scale), lengths
    )


def register_fakes() -> None:
    """Register the fake (meta) implementations of the ops (once; after the library
    declaring them is loaded, which :func:`sinkhorn_ot.native.build` does).

    They check the inputs like the wrappers and return empty outputs: ``f (B, N)``,
    ``g (B, M)`` in the input dtype, ``n_iter (B,)`` int64, ``err (B,)`` float64.

    Example:
        >>> from sinkhorn_ot import native, ops
        >>> _ = native.build(cuda=False, verbose=False)
        >>> ops.register_fakes()  # already done by the build: a no-op
    """
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    def outputs(ref: torch.Tensor, batch: int, n: int, m: int) -> Outputs:
        return (
            ref.new_empty((batch, n)),
            ref.new_empty((batch, m)),
            ref.new_empty((batch,), dtype=torch.int64),
            ref.new_empty((batch,), dtype=torch.float64),
        )

    @torch.library.register_fake("sinkhorn_ot::solve")
    def _solve_fake(
        C, a, b, f0, eps_table, max_iter, tol, method, rho=None, stop="marginals",
        momentum=1.0, momentum_auto=False,
    ):  # fmt: skip
        _check_dense(C, a, b, f0, eps_table, max_iter, tol, method, rho, stop)
        batch, n, m = C.shape
        return outputs(C, batch, n, m)

    @torch.library.register_fake("sinkhorn_ot::solve_points")
    def _solve_points_fake(
        x, y, a, b, f0, eps_table, max_iter, tol, method, cost, cost_scale, rho=None,
        stop="marginals", momentum=1.0, momentum_auto=False,
    ):  # fmt: skip
        _check_points(x, y, a, b, f0, eps_table, max_iter, tol, method, cost, cost_scale, rho, stop)
        return outputs(x, x.shape[0], x.shape[1], y.shape[1])

    @torch.library.register_fake("sinkhorn_ot::point_softmin")
    def _point_softmin_fake(x, y, h, eps, cost, cost_scale, row_lengths=None):
        _check_softmin(x, y, h, eps, cost, cost_scale, row_lengths)
        return x.new_empty(x.shape[:2])

    _FAKES_REGISTERED = True
