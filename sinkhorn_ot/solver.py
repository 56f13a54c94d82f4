"""``sinkhorn()``: validate, choose method and backend, run the loop, build the result."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import _validation as v
from . import native
from ._loop import KernelUnderflowError, eps_table, solve
from ._updates import log_plan, safe_log
from .autograd import envelope_value, implicit_potentials
from .geometry import DenseCost, Geometry
from .plan import LazyPlan
from .result import SinkhornResult


class SinkhornConvergenceWarning(UserWarning):
    """Some problems of a batch did not reach ``tol`` within ``max_iter`` iterations."""


#: ``method="auto"`` uses the kernel form only while ``max |C| / eps`` stays below this,
#: far from where ``exp(-C / eps)`` underflows (about 87 in float32, 708 in float64).
KERNEL_SAFE_RANGE = {torch.float32: 50.0, torch.float64: 500.0}

_DEFAULT_TOL = 1e-5


def sinkhorn(
    C: torch.Tensor | Geometry,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float | torch.Tensor,
    method: str = "log",
    max_iter: int = 1000,
    tol: float | None = _DEFAULT_TOL,
    grad: str = "implicit",
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps_scaling: float | None = None,
    backend: str = "auto",
) -> SinkhornResult:
    """Solve a batch of entropic optimal transport problems.

    Minimises ``<C, P> + eps * KL(P || a b^T)`` over plans ``P >= 0`` with row sums
    ``a`` and column sums ``b``, by Sinkhorn iterations on the potentials of
    ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``. One iteration updates ``g``
    (columns) then ``f`` (rows); the plan uses a ``g`` recomputed from the last ``f``,
    so ``method="kernel", max_iter=T, tol=None`` is exactly Algorithm 1 of the ELIM
    appendix (u initialised to 1/n, T updates of u, then v = b / K^T u).

    Args:
        C: cost, ``(N, M)`` or ``(B, N, M)``, float16/bfloat16 (computed in float32),
            float32 or float64. Unbatched input gives unbatched outputs.
        a: row weights ``(N,)``/``(B, N)``, non-negative; ``None`` = uniform (with the
            mass of ``b`` if ``b`` is given, else 1). Zero weights mark padding and give
            exactly-zero plan rows.
        b: column weights ``(M,)``/``(B, M)``; same total mass as ``a`` per problem.
        eps: regularisation ``> 0``, a float or a ``(B,)`` tensor.
        method: ``"log"`` (log-sum-exp, stable for any eps), ``"kernel"`` (``u, v``
            scalings with ``K = exp(-C / eps)``: faster, raises
            :class:`KernelUnderflowError` when it underflows) or ``"auto"`` (kernel
            while ``max|C|/eps`` is small, log otherwise or on underflow).
        max_iter: maximum number of iterations.
        tol: stop each problem once ``(||P 1 - a||_1 + ||P^T 1 - b||_1) / sum(a) <= tol``
            (checked every iteration; converged problems stop updating). ``None`` runs
            exactly ``max_iter`` iterations; ``converged`` then reports ``err <= 1e-5``.
        grad: how gradients reach ``C``, ``a``, ``b`` and a tensor ``eps``:
            ``"implicit"`` (default; implicit function theorem at the fixed point, for
            every output, memory independent of ``max_iter``), ``"envelope"`` (Danskin:
            gradients of ``value`` only, other outputs detached), ``"unroll"``
            (autograd through every iteration) or ``"none"`` (detached). Padded entries
            (zero weights) always get exactly zero gradient.
        init: warm start ``(f, g)``, e.g. the potentials of an earlier result. The loop
            starts with a column update, so only ``f`` determines the iterates.
        eps_scaling: ``None`` or a factor ``s`` in (0, 1): iteration ``t`` uses
            ``max(eps, max|C| * s**t)``, annealing from the cost scale down to ``eps``.
        backend: ``"auto"`` (native if available for the device and dtype, else torch),
            ``"torch"`` or ``"native"`` (error if unavailable).

    Returns:
        :class:`SinkhornResult` with ``plan (B, N, M)``, ``f (B, N)``, ``g (B, M)``,
        ``value``, ``value_linear``, ``n_iter``, ``err``, ``converged`` (all ``(B,)``)
        and the ``method``/``backend`` used. A problem that did not reach ``tol`` has
        ``converged=False`` and one :class:`SinkhornConvergenceWarning` is issued.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import sinkhorn
        >>> C = torch.rand(8, 5, 7, dtype=torch.float64)
        >>> res = sinkhorn(C, eps=0.1)
        >>> res.plan.shape, bool(res.converged.all())
        (torch.Size([8, 5, 7]), True)
        >>> torch.allclose(res.plan.sum(-1), torch.full((8, 5), 1 / 5, dtype=torch.float64), atol=1e-5)
        True
    """
    method = v.check_choice("method", method, v.METHODS)
    grad = v.check_choice("grad", grad, v.GRADS)
    backend = v.check_choice("backend", backend, v.BACKENDS)
    max_iter = v.check_int("max_iter", max_iter, 0)
    tol = v.check_tol(tol)
    eps_scaling = v.check_eps_scaling(eps_scaling)
    problem = v.check_problem(C, a, b, eps)
    ab, bb, eps_b = problem.a, problem.b, problem.eps
    geometry = problem.geometry
    batch, n, m = geometry.shape
    f0 = v.check_init(init, batch, n, m, problem.batched, ab)
    if f0 is None:
        f0 = _default_init(ab, eps_b)
    else:
        f0 = f0.to(ab.dtype)

    if isinstance(geometry, DenseCost):
        geometry = DenseCost(_mask_padding_gradient(geometry.C, ab, bb))
    elif grad == "unroll":
        geometry = geometry.without_padding_gradient(ab, bb)
    backend_used = _select_backend(backend, geometry, grad)
    methods = _candidate_methods(method, geometry, eps_b)
    scale = geometry.scale() if eps_scaling is not None else eps_b
    table = eps_table(eps_b, scale, eps_scaling)  # (B, S)
    # Only "unroll" records the iterations; the other modes attach gradients afterwards.
    context = torch.enable_grad() if grad == "unroll" else torch.no_grad()
    with context:
        for i, method_used in enumerate(methods):
            try:
                f, g, n_iter, err = _run(
                    backend_used, geometry, ab, bb, f0, table, max_iter, tol, method_used
                )
                break
            except KernelUnderflowError:
                if i + 1 == len(methods):
                    raise
    if grad == "implicit":
        f, g = implicit_potentials(geometry, ab, bb, eps_b, f, g)
    parts = (geometry, ab, bb, eps_b, f, g, n_iter, err, tol, method_used, backend_used)
    if grad == "envelope":
        with torch.no_grad():
            result = _build_result(*parts)
        value = envelope_value(
            geometry, ab, bb, eps_b, result.f, result.g, result.plan, result.value,
            result.value_linear,
        )
        result = dataclasses.replace(result, value=value)
    elif grad == "none":
        with torch.no_grad():
            result = _build_result(*parts)
    else:
        result = _build_result(*parts)
    if tol is not None and not bool(result.converged.all()):
        bad = (~result.converged).nonzero().flatten().tolist()
        warnings.warn(
            f"sinkhorn did not reach tol={tol:g} within max_iter={max_iter} iterations in "
            f"{len(bad)} of {batch} problem(s) (e.g. problem {bad[0]}, err="
            f"{float(result.err[bad[0]]):.3g}); raise max_iter, raise eps, or use eps_scaling",
            SinkhornConvergenceWarning,
            stacklevel=2,
        )
    return result if problem.batched else _unbatch(result)


def _default_init(a: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``f0 = -eps log a`` makes the scaling ``u = a exp(f / eps)`` uniform, as the
    paper's ``u = 1/n`` start does (a constant factor in u cancels in the first
    column update). Padding rows start at 0."""
    positive = a > 0
    return torch.where(positive, -eps.unsqueeze(-1) * torch.where(positive, a, 1).log(), 0)


def _mask_padding_gradient(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Same values; no gradient reaches cost entries of padded rows or columns."""
    if not C.requires_grad:
        return C
    padded = (a == 0).unsqueeze(2) | (b == 0).unsqueeze(1)
    return torch.where(padded, C.detach(), C) if bool(padded.any()) else C


def _select_backend(backend: str, geometry, grad: str) -> str:
    if backend == "torch":
        return "torch"
    ok, reason = native.availability(geometry.device, geometry.dtype)
    if backend == "native":
        if not ok:
            raise RuntimeError(f"backend='native' is not available: {reason}")
        if grad == "unroll":
            raise ValueError(
                "backend='native' cannot unroll autograd through its loop; use grad='implicit', "
                "'envelope' or 'none', or backend='torch' for grad='unroll'"
            )
        return "native"
    return "native" if ok and grad != "unroll" else "torch"


def _candidate_methods(method: str, geometry, eps: torch.Tensor) -> tuple[str, ...]:
    if method != "auto":
        return (method,)
    scale = (geometry.scale() / eps.detach()).max().item()
    if scale <= KERNEL_SAFE_RANGE.get(geometry.dtype, 50.0):
        return ("kernel", "log")
    return ("log",)


def _run(backend, geometry, a, b, f0, table, max_iter, tol, method):
    if backend == "native":
        # TEMPORARY until the ops module lands: the old dense wrapper.
        raise NotImplementedError("native backend being rewired")
    return solve(geometry, a, b, f0, table, max_iter=max_iter, tol=tol, method=method)


def _build_result(geometry, a, b, eps, f, g, n_iter, err, tol, method, backend) -> SinkhornResult:
    mass = a.sum(-1)  # (B,)
    # Potentials are defined up to (f + c, g - c): split the constant so <f,a> = <g,b>.
    shift = ((g * b).sum(-1) - (f * a).sum(-1)) / (2 * mass)  # (B,)
    f = f + shift.unsqueeze(-1)
    g = g - shift.unsqueeze(-1)
    value = (f * a).sum(-1) + (g * b).sum(-1)
    if isinstance(geometry, DenseCost):
        C = geometry.C
        plan = log_plan(C, safe_log(a), safe_log(b), f, g, eps.unsqueeze(-1))
        value_linear = (C * plan).sum(dim=(1, 2))
    else:
        plan = LazyPlan(geometry, f, g, a, b, eps)
        value_linear = plan.linear_value()
    converged = err <= (tol if tol is not None else _DEFAULT_TOL)
    return SinkhornResult(plan, f, g, value, value_linear, n_iter, err, converged, method, backend)


def _unbatch(r: SinkhornResult) -> SinkhornResult:
    plan = r.plan
    if isinstance(plan, LazyPlan):
        plan = LazyPlan(plan.geometry, plan.f, plan.g, plan.a, plan.b, plan.eps, batched=False)
    else:
        plan = plan[0]
    return SinkhornResult(
        plan,
        r.f[0],
        r.g[0],
        r.value[0],
        r.value_linear[0],
        r.n_iter[0],
        r.err[0],
        r.converged[0],
        r.method,
        r.backend,
    )
