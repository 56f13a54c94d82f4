"""``sinkhorn()``: validate, choose method and backend, run the loop, build the result."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from . import _arrays, _build, _newton, _polish, _tolerance, ops
from . import _unbalanced as ub
from . import _validation as v
from ._loop import KernelUnderflowError, eps_table, solve
from ._updates import log_plan, safe_log
from .autograd import envelope_value, implicit_potentials
from .errors import SinkhornConvergenceWarning
from .geometry import DenseCost, Geometry
from .plan import LazyPlan
from .result import SinkhornResult

#: ``method="auto"`` uses the kernel form only while ``max |C| / eps`` stays below this,
#: far from where ``exp(-C / eps)`` underflows (about 87 in float32, 708 in float64).
KERNEL_SAFE_RANGE = {torch.float32: 50.0, torch.float64: 500.0}

_DEFAULT_TOL = _tolerance.DEFAULT_TOL


def sinkhorn(
    C: torch.Tensor | Geometry,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float | torch.Tensor,
    method: str = "log",
    max_iter: int = 1000,
    tol: float | str | None = "auto",
    grad: str = "implicit",
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps_scaling: float | None = None,
    eps_stage_iters: int = 1,
    backend: str = "auto",
    group=None,
    shard_y: bool = False,
    rho_a: float | torch.Tensor | None = None,
    rho_b: float | torch.Tensor | None = None,
    stop: str | None = None,
    momentum: float | str | None = None,
    newton: bool | str = "auto",
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
            float32 or float64. Unbatched input gives unbatched outputs. ``C``, ``a``,
            ``b``, a ``(B,)`` ``eps`` and ``init`` may also be NumPy arrays (or anything
            :func:`torch.as_tensor` reads); with no tensor among ``C``, ``a``, ``b`` the
            result's fields are NumPy arrays (POT users' first line works unchanged).
        a: row weights ``(N,)``/``(B, N)``, non-negative; ``None`` = uniform (with the
            mass of ``b`` if ``b`` is given, else 1). Zero weights mark padding and give
            exactly-zero plan rows.
        b: column weights ``(M,)``/``(B, M)``; same total mass as ``a`` per problem.
        eps: regularisation ``> 0``, a float or a ``(B,)`` tensor.
        method: ``"log"`` (log-sum-exp, stable for any eps), ``"kernel"`` (``u, v``
            scalings with ``K = exp(-C / eps)``: faster, raises
            :class:`KernelUnderflowError` when it underflows), ``"stabilised"`` (the
            log-domain iterates at kernel-form speed on the native CPU backend for a
            dense cost, by a kernel relative to absorbed potentials; one more
            ``(N, M)`` buffer; elsewhere it runs ``"log"``) or ``"auto"`` (kernel
            while ``max|C|/eps`` is small, log otherwise or on underflow).
        max_iter: maximum number of iterations.
        tol: stop each problem once ``(||P 1 - a||_1 + ||P^T 1 - b||_1) / sum(a) <= tol``
            (checked every iteration; converged problems stop updating). ``"auto"``
            (default): ``1e-5``, or where higher the dtype's rounding floor
            ``torch.finfo(dtype).eps * max|C| / eps`` (real entries, the largest over the
            batch), below which no plan of that dtype gets (float32 at small eps;
            docs/conventions.md, "The default tolerance"); the float64 Newton polish
            still aims at ``1e-5``. ``None`` runs exactly ``max_iter`` iterations;
            ``converged`` then reports ``err <= 1e-5``. ``result.tol`` is the value used.
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
        eps_stage_iters: with ``eps_scaling``, iterations per eps of the annealing
            (stage-wise schedule: ``k`` iterations at each ``max|C| * s**t``).
        backend: ``"auto"`` (native if available for the device and dtype, else torch),
            ``"torch"`` or ``"native"`` (error if unavailable).
        group: ``None`` (one process) or a ``torch.distributed`` process group over
            which the problem is sharded: each rank passes a contiguous slice of the
            rows (``x`` or ``C``) and their weights ``a``; ``y``, ``b`` are replicated.
            ``f`` comes back sharded like ``x``, ``g`` replicated, ``value`` and
            ``converged`` the same on every rank (docs/distributed.md).
        shard_y: with ``group``, the columns are sharded too: each rank passes its own
            slice of ``y`` and ``b`` (a :class:`PointCloud`), and ``g`` comes back
            sharded like ``y``.
        rho_a, rho_b: relaxation of the row / column marginal (unbalanced OT, see
            docs/unbalanced.md): ``None`` or ``inf`` keeps it a hard constraint; a float
            or a ``(B,)`` tensor ``> 0`` adds ``rho * KL(P 1 | a)`` (resp. ``P^T 1 | b``,
            generalised KL) to the objective instead. Relaxed problems need no equal
            masses, keep their potentials unnormalised, report ``value`` = the full
            objective (from the duals) and stop on ``stop="potentials"``. With
            ``group``: rows sharded only, ``grad="envelope"``/``"none"``.
        stop: the stopping rule. ``"marginals"`` (the relative L1 marginal violation
            above; the default of balanced problems) or ``"potentials"``: the sup-norm
            change of the row potential over one iteration relative to eps, ``max_i
            |f_next_i - f_i| / eps`` (the rule, and the only one, of relaxed problems;
            ``err`` is then the larger of that change and the violation of the hard
            marginals). ``None`` chooses per problem.
        momentum: ``None`` (plain Sinkhorn), a factor ``omega`` in (0, 2), or
            ``"auto"``: over-relaxation from the target eps on (after any annealing),
            each half-step moving its potential ``omega`` of the way to the Sinkhorn
            update, ``f <- f + omega (row(g) - f)``, ``g <- g + omega (col(f) - g)``
            (as OTT-JAX's ``momentum``). ``"auto"`` runs 20 plain iterations at the
            target eps, then fixes per problem ``omega = 2 / (1 + sqrt(1 - theta))``
            from the error's contraction rate ``theta`` over the last 10 (Lehmann et
            al. 2021). ``err`` then counts both marginals. Balanced problems only; the
            torch and native CPU backends (``"auto"`` runs torch on a GPU) and
            ``method`` ``"log"`` or ``"kernel"``. See docs/choosing.md.
        newton: the Newton polish of problems Sinkhorn is slow on (docs/choosing.md,
            "Newton polish"). ``"auto"`` (default): a problem still above ``tol`` after
            20 iterations at the target eps is solved again by a continuation in
            eps: an annealed Sinkhorn run (``eps_scaling=0.7`` unless given,
            ``momentum="auto"`` where the backend has it) into ``16 eps``, then at
            ``16, 8, 4, 2, 1 x eps`` Sinkhorn to an error of 1e-2 and Levenberg-Marquardt
            Newton steps on the semi-dual (float64, a dense ``N x N`` solve each, one
            iteration each in ``n_iter``), then Sinkhorn again if the last stall; only
            for balanced problems on the marginals rule with ``tol`` set, ``grad``
            other than ``"unroll"``, ``N <= 2048`` and ``B N max(N, M) <= 2**23``, and
            not sharded, and only where 10 more iterations show a rate that predicts
            over 500 more (or more than the budget); the others continue plain for up
            to 500 before they are polished. Problems that converge within the 20
            iterations, or within the continuation, get the iterates of ``False``.
            ``True``: the same from the end of the schedule on (no wait, no size
            limit); ``False``: plain Sinkhorn only.

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
    if group is not None or shard_y:
        from .distributed import sharded_sinkhorn

        settings = {"method": method, "max_iter": max_iter, "tol": tol, "grad": grad}
        settings.update(init=init, eps_scaling=eps_scaling, backend=backend, shard_y=shard_y)
        settings.update(rho_a=rho_a, rho_b=rho_b, stop=stop, eps_stage_iters=eps_stage_iters)
        if momentum not in (None, 1, 1.0):
            raise NotImplementedError(
                f"`momentum` is not supported for sharded solves (group=...), got {momentum!r}"
            )
        if newton is True:  # "auto" means no polish there
            raise NotImplementedError(
                "`newton=True` is not supported for sharded solves (group=...); use 'auto' or False"
            )
        return sharded_sinkhorn(C, a, b, eps=eps, group=group, **settings)
    arrays = _arrays.Arrays(C, a, b)  # NumPy inputs: tensors inside, NumPy results
    C, a, b, eps, init = (*map(arrays.tensor, (C, a, b, eps)), arrays.pair(init))
    method = v.check_choice("method", method, v.METHODS)
    grad = v.check_choice("grad", grad, v.GRADS)
    backend = v.check_choice("backend", backend, v.BACKENDS)
    max_iter = v.check_int("max_iter", max_iter, 0)
    tol = v.check_tol(tol, auto=True)
    eps_scaling = v.check_eps_scaling(eps_scaling)
    eps_stage_iters = v.check_int("eps_stage_iters", eps_stage_iters, 1)
    stop = None if stop is None else v.check_choice("stop", stop, ub.STOP_RULES)
    momentum = v.check_momentum(momentum)
    newton = v.check_newton(newton)
    rho_a, rho_b = arrays.tensor(rho_a), arrays.tensor(rho_b)
    problem = v.check_problem(C, a, b, eps, rho_a, rho_b)
    ab, bb, eps_b, rho = problem.a, problem.b, problem.eps, problem.rho
    geometry = problem.geometry
    batch, n, m = geometry.shape
    warm = v.check_init(init, batch, n, m, problem.batched, ab)
    potentials = _stop_rule(stop, rho, batch, ab.device)

    offset = problem.offset
    if isinstance(geometry, DenseCost):
        # Costs are shift invariant: solve on C - c where an offset dominates the spread,
        # so that float32 potentials keep their digits (the outputs are shifted back).
        # (Not for a relaxed marginal: validation leaves their offset at 0.)
        C_solved = geometry.C if offset is None else geometry.C - offset.view(-1, 1, 1)
        if problem.padded:
            C_solved = _mask_padding_gradient(C_solved, ab, bb)
        geometry = DenseCost(C_solved)
    elif grad == "unroll" and problem.padded:
        geometry = geometry.without_padding_gradient(ab, bb)
    # "auto": 1e-5, or the dtype's rounding floor at this max|C| / eps where higher; the
    # float64 Newton polish still aims at 1e-5 (_tolerance.aim).
    requested = tol
    if _tolerance.is_auto(tol):
        scale_of_real = _tolerance.real_cost_scale(geometry, ab, bb)
        tol = _tolerance.resolve(tol, geometry.dtype, scale_of_real, eps_b)
    if warm is None:
        f0 = _default_init(ab, eps_b)
    else:  # a warm start comes in the user's frame: move it to the shifted cost's
        f0 = warm.to(ab.dtype) if offset is None else warm.to(ab.dtype) - offset.unsqueeze(-1) / 2
    _check_momentum_use(momentum, rho, potentials, method, backend, geometry)
    backend_used = _select_backend(backend, geometry, grad, momentum)
    methods = _candidate_methods(method, geometry, eps_b)
    scale = geometry.scale() if eps_scaling is not None else eps_b
    table = eps_table(eps_b, scale, eps_scaling, eps_stage_iters)  # (B, S)
    polish = _newton_use(newton, tol, rho, potentials, grad, geometry.shape)
    # With the polish, the loop gets the schedule plus the patience; the rest of the
    # budget goes to the problems that have not converged by then (_polish.finish).
    loop_iter = _polish.loop_budget(polish, newton, max_iter, table)
    # Only "unroll" records the iterations; the other modes attach gradients afterwards.
    context = torch.enable_grad() if grad == "unroll" else torch.no_grad()
    with context:
        for i, method_used in enumerate(methods):
            try:
                f, g, n_iter, err = _run(
                    backend_used, geometry, ab, bb, f0, table, loop_iter, tol, method_used,
                    rho, potentials, momentum=momentum,
                )  # fmt: skip
                break
            except KernelUnderflowError:
                if i + 1 == len(methods):
                    raise
        if polish:
            settings = {"tol": tol, "max_iter": max_iter, "newton": newton}
            settings.update(newton_tol=_tolerance.aim(requested, tol))
            settings.update(method=method_used, momentum=momentum, backend=backend_used)
            settings.update(eps_scaling=eps_scaling, eps_stage_iters=eps_stage_iters)
            f, g, n_iter, err = _polish.finish(
                _run, geometry, ab, bb, eps_b, f, g, n_iter, err, **settings
            )
        f, g = complete_potentials(
            geometry, ab, bb, f, g, table, max_iter, rho, padded_rows=problem.padded_rows
        )
        # err describes the plan that is returned (both marginals, float64), computed once.
        f, g, n_iter, err, plan = _refine(
            backend_used, geometry, ab, bb, eps_b, f, g, n_iter, err, tol, max_iter, method_used,
            rho, potentials, table.shape[1] - 1 > max_iter, momentum=momentum,
        )  # fmt: skip
    if grad == "implicit" and _any_requires_grad(geometry, ab, bb, eps_b, rho):
        f, g = implicit_potentials(geometry, ab, bb, eps_b, f, g, rho)
        plan = None  # rebuilt from the potentials that carry the gradients
    parts = (geometry, ab, bb, eps_b, f, g, n_iter, err, tol, method_used, backend_used)
    parts = (*parts, rho, plan)
    if grad == "envelope":
        with torch.no_grad():
            result = _build_result(*parts)
        value = envelope_value(
            geometry,
            ab,
            bb,
            eps_b,
            result.f,
            result.g,
            result.plan,
            result.value,
            result.value_linear,
            rho,
        )
        result = dataclasses.replace(result, value=value)
    elif grad == "none":
        with torch.no_grad():
            result = _build_result(*parts)
    else:
        result = _build_result(*parts)
    if offset is not None:
        result = _shift_back(result, offset, ab)
    warn_unconverged(result, tol, max_iter, stacklevel=3)
    return arrays.back(result if problem.batched else _unbatch(result))


def warn_unconverged(result: SinkhornResult, tol, max_iter: int, stacklevel: int) -> None:
    """One :class:`SinkhornConvergenceWarning` if some problem missed ``tol``."""
    if tol is not None and not bool(result.converged.all()):
        bad = (~result.converged).nonzero().flatten().tolist()
        warnings.warn(
            f"sinkhorn did not reach tol={tol:g} within max_iter={max_iter} iterations in "
            f"{len(bad)} of {len(result.converged)} problem(s) (e.g. problem {bad[0]}, err="
            f"{float(result.err[bad[0]]):.3g}); raise max_iter, raise eps, or use eps_scaling",
            SinkhornConvergenceWarning,
            stacklevel=stacklevel,
        )


def _stop_rule(stop, rho, batch: int, device) -> torch.Tensor | None:
    """``(B,)`` bool: problems that stop on their potentials, or ``None`` if none does."""
    if rho is None:  # balanced: decided without reading the device
        everywhere = torch.ones(batch, dtype=torch.bool, device=device)
        return everywhere if stop == "potentials" else None
    relaxed = ub.relaxed_problems(rho, batch, device)
    if stop == "marginals" and bool(relaxed.any()):
        k = int(relaxed.nonzero()[0])
        raise ValueError(
            "`stop` must be 'potentials' or None for problems with a relaxed marginal "
            f"(rho_a or rho_b finite, e.g. problem {k}): their marginals are not constraints, "
            "got stop='marginals'"
        )
    potentials = relaxed | (stop == "potentials")
    return potentials if bool(potentials.any()) else None


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
    return torch.where(padded, C.detach(), C)


def _check_momentum_use(momentum, rho, potentials, method, backend, geometry) -> None:
    """Where ``momentum`` is defined: balanced problems on the marginals rule."""
    if momentum == 1.0:
        return
    if rho is not None or potentials is not None:
        raise ValueError(
            "`momentum` needs balanced problems stopping on their marginals (no rho_a/rho_b, "
            f"stop='marginals'), got momentum={momentum!r}"
        )
    if method == "stabilised" and geometry.device.type == "cpu" and backend != "torch":
        raise ValueError(
            f"`momentum` runs with method 'log', 'kernel' or 'auto', got method='stabilised' "
            f"(momentum={momentum!r})"
        )
    if backend == "native" and geometry.device.type != "cpu":
        raise ValueError(
            f"`momentum` is not implemented in the CUDA kernels (momentum={momentum!r}); use "
            "backend='auto' or 'torch'"
        )


def _newton_use(newton, tol, rho, potentials, grad, shape) -> bool:
    """Whether this call runs the Newton polish (``newton=True`` where it cannot raises)."""
    if newton is False:
        return False
    unsupported = None
    if tol is None:
        unsupported = "tol=None (a fixed number of iterations)"
    elif rho is not None or potentials is not None:
        unsupported = "relaxed marginals or stop='potentials'"
    elif grad == "unroll":
        unsupported = "grad='unroll' (its steps are not unrolled)"
    if newton == "auto":
        return unsupported is None and _newton.size_ok(shape)
    if unsupported is not None:
        raise ValueError(
            "`newton=True` needs balanced problems on the marginals rule with a tol and "
            f"grad other than 'unroll', got {unsupported}"
        )
    return True


def _select_backend(backend: str, geometry, grad: str, momentum=1.0) -> str:
    if backend == "torch":
        return "torch"
    if momentum != 1.0 and geometry.device.type != "cpu":  # the CUDA loops have none
        return "torch"
    ok, reason = _build.availability(geometry.device, geometry.dtype)
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


def _run(
    backend, geometry, a, b, f0, table, max_iter, tol, method, rho=None, potentials=None,
    *, momentum=1.0,
):  # fmt: skip
    if backend == "native":
        # The only host sync left with tol=None and method="log" is validation's.
        check_finite = tol is not None or method != "log"
        settings = {"max_iter": max_iter, "tol": tol, "method": method}
        settings["check_finite"] = check_finite
        if momentum != 1.0:  # the default ops stay as they were
            settings["momentum"] = momentum
        if rho is not None or potentials is not None:  # the balanced ops stay as they were
            settings["rho"] = None if rho is None else rho.detach()
            # The per-problem rule: relaxed problems always use the potentials rule.
            use_all = potentials is not None and bool(potentials.all())
            settings["stop"] = "potentials" if use_all else "marginals"
        if isinstance(geometry, DenseCost):
            return ops.solve_dense(geometry.C, a, b, f0, table, **settings)
        x, y = (t.detach().contiguous() for t in geometry.centred_points())
        cost = {"cost": geometry.cost, "cost_scale": geometry.cost_scale}
        return ops.solve_points(x, y, a, b, f0, table, **settings, **cost)
    return solve(
        geometry, a, b, f0, table, max_iter=max_iter, tol=tol, method=method, rho=rho,
        potentials=potentials, momentum=momentum,
    )  # fmt: skip


def _any_requires_grad(geometry: Geometry, *tensors: torch.Tensor | None) -> bool:
    inputs = (geometry.C,) if isinstance(geometry, DenseCost) else (geometry.x, geometry.y)
    return any(t is not None and t.requires_grad for t in (*inputs, *tensors))


def _build_result(
    geometry, a, b, eps, f, g, n_iter, err, tol, method, backend, rho=None, plan=None,
    shards=None,
) -> SinkhornResult:  # fmt: skip
    """The result of raw loop potentials ``f, g``; ``plan`` is their plan if already built.

    ``shards``: ``None``, or for rows sharded over ranks an object whose ``total(t)``
    sums a sum over rows over ranks and whose ``local(t)`` marks a replicated tensor
    entering this rank's rows (:mod:`sinkhorn_ot.distributed`)."""
    total = _local if shards is None else shards.total
    local = _local if shards is None else shards.local
    mass = total(a.sum(-1))  # (B,)
    # Potentials are defined up to (f + c, g - c): split the constant so <f,a> = <g,b>.
    # The plan comes from the potentials as the loop left them: the shift is exact in
    # exact arithmetic, but its rounding (one ulp of f, a bias per row) would cost float32
    # plans about ulp(f) / eps of marginal accuracy, 1e-5 at eps = 0.01.
    if plan is None:
        plan = _plan_of(geometry, a, local(b), local(eps), f, local(g))
    relaxed = ub.relaxed_problems(rho, a.shape[0], a.device)
    shift = ((g * b).sum(-1) - total((f * a).sum(-1))) / (2 * mass)  # (B,)
    if rho is not None:  # a relaxed problem has one solution: no constant to split
        shift = torch.where(relaxed, 0, shift)
    f = f + local(shift).unsqueeze(-1)
    g = g - shift.unsqueeze(-1)
    value = total((f * a).sum(-1)) + (g * b).sum(-1)
    if rho is not None:  # the full objective, mass terms included (docs/unbalanced.md)
        plan_mass = plan.marginals()[0].sum(-1) if isinstance(plan, LazyPlan) else plan.sum((1, 2))
        dual = ub.dual_value(f, g, a, b, eps, rho, total(plan_mass), row_total=total)
        value = torch.where(relaxed, dual, value)
    if isinstance(plan, LazyPlan):
        value_linear = total(plan.linear_value())
    else:
        value_linear = total((geometry.C * plan).sum(dim=(1, 2)))
    # err: the violation of this plan, both marginals, in float64 (from _refine).
    reference = tol if tol is not None else _DEFAULT_TOL
    converged = err <= reference
    parts = (plan, f, g, value, value_linear, n_iter, err, converged, method, backend)
    return SinkhornResult(*parts, tol=reference)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def complete_potentials(geometry, a, b, f, g, table, max_iter, rho=None, padded_rows=None):
    """What every backend's ``(f, g)`` still needs, on the torch side (shared).

    * A schedule longer than ``max_iter`` (``eps_scaling``) left ``g`` at a larger eps:
      recompute ``g = col(f)`` at the target eps, so the plan is finite and meets its
      column marginal (its row marginal tells how far the run got; ``converged`` is then
      false unless the plan meets ``tol``).
    * Padded rows (``a_i = 0``) get the soft c-transform ``f_i = row(g)_i`` of the
      returned ``g``, whatever the iteration count (it was stale at ``n_iter = 0``).

    ``padded_rows`` overrides whether any row is padding (a sharded solve decides it
    over all ranks, since its row update is a collective).
    """
    unfinished = table.shape[1] - 1 > max_iter
    if padded_rows is None:  # the caller did not read it with validation's host sync
        padded_rows = bool((a == 0).any())
    if not (unfinished or padded_rows):
        return f, g
    eps = table[:, -1:]
    step = geometry.log_step(safe_log(a), safe_log(b), eps, ub.damping(rho, eps))
    if unfinished:
        g = step.col(f)
    if padded_rows:
        f = torch.where(a > 0, f, step.row(g))
    return f, g


#: Rounds of :func:`_refine`, each with a tolerance this much tighter than the last.
_REFINE_ROUNDS, _REFINE_FACTOR = 3, 0.25
#: A round counts as progress when it brought the plan's error below this fraction of
#: what it was.
_REFINE_PROGRESS = 0.5


def _refine(
    backend, geometry, a, b, eps, f, g, n_iter, err, tol, max_iter, method, rho=None,
    potentials=None, unfinished=False, *, momentum=1.0,
):  # fmt: skip
    """Iterate on where the loop stopped but the returned plan misses ``tol``.

    The loop's test sees the row marginal of ``(f, col(f))`` and takes the column
    marginal as exact, which rounding (float32) can break by a few ulps per entry: a
    violation just under ``tol`` in the loop can be just over it for the plan. Such
    problems continue from their potentials with a tighter loop tolerance, within the
    same ``max_iter`` budget; the others are left bit for bit as they were.

    Returns ``f, g, n_iter``, the error of the returned ``(f, g)`` (the violation of
    their plan, :func:`plan_violation`, or for problems that stop on their potentials
    the :func:`certified_error`) and that plan; with ``tol=None`` only the plan and its
    error are computed.
    """

    def certify(f, g, change):
        return certified_error(geometry, a, b, eps, f, g, rho, potentials, change, with_plan=True)

    # The loop's err of a problem on the potentials rule is the change of the (f, g) it
    # returned, unless an unfinished schedule recomputed g (complete_potentials).
    certified, plan = certify(f, g, None if unfinished else err)
    loop_tol = tol
    # A problem whose plan did not improve in a round is at its dtype's rounding floor
    # (float32 at small eps): tighter rounds would only spend its budget.
    improving = torch.ones_like(certified, dtype=torch.bool)
    for _ in range(_REFINE_ROUNDS if tol is not None else 0):
        redo = (certified > tol) & (err <= loop_tol) & (n_iter < max_iter) & improving
        if not bool(redo.any()):
            break
        index = redo.nonzero().flatten()
        sub = geometry.select(index)
        loop_tol = loop_tol * _REFINE_FACTOR
        budget = int((max_iter - n_iter[index]).min())
        table = eps[index].unsqueeze(-1)
        rho_sub = None if rho is None else rho[index]
        rule_sub = None if potentials is None else potentials[index]
        f_sub, g_sub, extra, err_sub = _run(
            backend, sub, a[index], b[index], f[index], table, budget, loop_tol, method,
            rho_sub, rule_sub, momentum=momentum,
        )  # fmt: skip
        f_sub, g_sub = complete_potentials(
            sub, a[index], b[index], f_sub, g_sub, table, budget, rho_sub
        )
        f, g = f.index_copy(0, index, f_sub), g.index_copy(0, index, g_sub)
        n_iter = n_iter.index_copy(0, index, n_iter[index] + extra)
        err = err.index_copy(0, index, err_sub)
        before = certified
        certified, plan = certify(f, g, None if unfinished else err)
        improving = certified < _REFINE_PROGRESS * before
    return f, g, n_iter, certified, plan


def certified_error(
    geometry, a, b, eps, f, g, rho=None, potentials=None, change=None, with_plan=False
):
    """``err (B,)`` float64 of the returned ``(f, g)`` under each problem's stopping rule.

    ``"marginals"``: :func:`plan_violation`. ``"potentials"``: the larger of the change
    :func:`sinkhorn_ot._unbalanced.potential_change` of one more row update and the
    relative L1 violation of the hard marginals (none for a fully relaxed problem): a
    relaxed side is never certified as a marginal, a hard one always is. ``change (B,)``
    is that change when the loop measured it on these very ``(f, g)`` (its ``err``),
    else ``None`` (one more row update computes it). ``with_plan``: return ``(err,
    plan)``, the plan of ``(f, g)`` it was computed from.
    """
    plan = _plan_of(geometry, a, b, eps, f, g)
    err = _certified_error(geometry, plan, a, b, eps, f, g, rho, potentials, change)
    return (err, plan) if with_plan else err


def _certified_error(geometry, plan, a, b, eps, f, g, rho, potentials, change):
    if potentials is None:
        return plan_violation(plan, a, b)
    with torch.no_grad():
        rows, cols = _marginals64(plan)
        balanced = torch.full_like(eps.unsqueeze(-1).expand(-1, 2), float("inf"))
        hard = ub.hard_violation(rows, cols, a, b, balanced if rho is None else rho)
        if change is None:
            e = eps.unsqueeze(-1)
            step = geometry.log_step(safe_log(a), safe_log(b), e, ub.damping(rho, e))
            change = ub.potential_change(f, step.row(g), a, e)
        return torch.where(potentials, torch.maximum(change, hard), hard)


def _plan_of(geometry, a, b, eps, f, g):
    if isinstance(geometry, DenseCost):
        return log_plan(geometry.C, safe_log(a), safe_log(b), f, g, eps.unsqueeze(-1))
    if not torch.is_grad_enabled():
        # grad="none"/"envelope": the lazy plan computes its products later, outside this
        # no_grad block, so it must hold detached inputs to be detached like a dense plan.
        geometry, a, b, eps = geometry.detach(), a.detach(), b.detach(), eps.detach()
        f, g = f.detach(), g.detach()
    return LazyPlan(geometry, f, g, a, b, eps)


def plan_violation(plan, a: torch.Tensor, b: torch.Tensor, row_total=None) -> torch.Tensor:
    """``(||P 1 - a||_1 + ||P^T 1 - b||_1) / sum(a)`` of a plan, in float64, ``(B,)``.

    ``row_total`` sums over ranks where ``plan`` is one rank's rows (``None``: all rows).
    """
    total = _local if row_total is None else row_total
    with torch.no_grad():
        rows, cols = _marginals64(plan)
        a64, b64 = a.detach().double(), b.detach().double()
        cols = total(cols)
        gap = total((rows - a64).abs().sum(-1)) + (cols - b64).abs().sum(-1)
        return gap / total(a64.sum(-1))


def _marginals64(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of a plan in float64, ``(B, N)``, ``(B, M)``."""
    if isinstance(plan, LazyPlan):
        return plan.marginals(dtype=torch.float64)
    # Sums accumulated in float64 without a float64 copy of the plan.
    plan = plan.detach()
    return plan.sum(2, dtype=torch.float64), plan.sum(1, dtype=torch.float64)


def _shift_back(result: SinkhornResult, offset: torch.Tensor, a: torch.Tensor) -> SinkhornResult:
    """Outputs of a problem solved on ``C - c`` for the ``C`` the user gave."""
    half = (offset / 2).unsqueeze(-1)
    mass = a.sum(-1)
    plan_mass = result.plan.sum(dim=(1, 2))
    return dataclasses.replace(
        result,
        f=result.f + half,
        g=result.g + half,
        value=result.value + offset * mass,
        value_linear=result.value_linear + offset * plan_mass,
    )


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
        r.tol,
    )
