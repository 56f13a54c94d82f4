"""Sinkhorn divergences as a loss: GeomLoss's ``SamplesLoss("sinkhorn")``, batched.

``S(α, β) = OT(α, β) - OT(α, α) / 2 - OT(β, β) / 2`` (plus ``eps / 2 (m(α) - m(β))^2``
when unbalanced), with ``OT`` the entropic cost of :func:`sinkhorn_ot.sinkhorn`
(``min <C, P> + eps KL(P || a b^T)``, marginals softened by ``rho KL`` when ``reach`` is
given). It is zero between equal measures, positive otherwise (at convergence) and tends
to the unregularised cost as ``blur -> 0``. See docs/divergence.md for the maths, the
mapping to GeomLoss, OTT-JAX and POT, and the examples.

Example:
    >>> import torch
    >>> from sinkhorn_ot import SinkhornLoss, sinkhorn_divergence
    >>> x = torch.randn(2, 50, 3, dtype=torch.float64)
    >>> y = torch.randn(2, 40, 3, dtype=torch.float64) + 1.0
    >>> value = sinkhorn_divergence(x, y, blur=0.05)
    >>> value.shape, bool((value > 0).all())
    (torch.Size([2]), True)
    >>> float(sinkhorn_divergence(x[0], x[0])) == 0.0
    True
    >>> loss = SinkhornLoss(blur=0.05)
    >>> bool(torch.equal(loss(x, y), value))
    True
"""

from __future__ import annotations

import torch

from . import _build
from . import _divergence_args as args
from ._divergence_implicit import implicit_value
from ._divergence_loop import (
    SymmetricLoop,
    centred,
    divergence_value,
    kept_lengths,
    stack_costs,
    stack_points,
    stacked_rows,
)
from ._divergence_schedule import bounding_diameters, epsilon_table
from ._validation import check_choice, check_int, check_tol, compute_dtype
from .geometry import DEFAULT_BLOCK_ELEMENTS, DenseCost, PointCloud

__all__ = ["SinkhornLoss", "sinkhorn_divergence"]

MODES = ("annealed", "converged")
GRADS = ("envelope", "implicit")
BACKENDS = ("auto", "native", "torch")
#: The cost of each ``p``: GeomLoss's ``|x - y|^p / p``.
POINT_COST = {1: ("euclidean", 1.0), 2: ("sqeuclidean", 0.5)}


def sinkhorn_divergence(
    x: torch.Tensor | DenseCost,
    y: torch.Tensor | tuple | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    blur: float | None = None,
    p: int = 2,
    reach: float | None = None,
    debias: bool = True,
    scaling: float = 0.5,
    eps: float | None = None,
    diameter: float | None = None,
    mode: str = "annealed",
    grad: str = "envelope",
    tol: float = 1e-6,
    max_iter: int = 1000,
    store_cost: bool | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    backend: str = "auto",
) -> torch.Tensor:
    """Sinkhorn divergence between weighted point clouds (or on given costs), batched.

    The arguments mean what they mean in GeomLoss's ``SamplesLoss("sinkhorn", p=p,
    blur=blur, reach=reach, debias=debias, scaling=scaling)``, and the default mode runs
    GeomLoss's iterations (its temperature list from the data diameter down to
    ``blur^p``, symmetric updates, last extrapolation), so the values agree to rounding.
    Differences: the diameter is per problem and ignores zero-weight points (so padding
    and the other problems of a batch never change a problem's value), unbalanced
    gradients use the first variation ``rho + eps`` (GeomLoss's autograd applies its
    forward ``rho + eps / 2``), and a single point does not divide by zero.

    Args:
        x: points ``(N, D)`` or ``(B, N, D)``; or a :class:`DenseCost` of ``C_xy``
            ``(B, N, M)`` (then ``y`` holds the self costs).
        y: points ``(M, D)`` or ``(B, M, D)``, dtype and device of ``x``; with a
            ``DenseCost`` ``x``: the pair ``(C_xx (B, N, N), C_yy (B, M, M))`` (tensors or
            ``DenseCost``), or ``None`` when ``debias=False``.
        a: weights ``(N,)``/``(B, N)``, non-negative; ``None`` = uniform with mass 1.
            Zero weights mark padding (:func:`sinkhorn_ot.pad_points`).
        b: weights ``(M,)``/``(B, M)``; same mass as ``a`` unless ``reach`` is given.
        blur: target blur, ``eps = blur^p`` (default 0.05). Give ``blur`` or ``eps``.
        p: 1 (cost ``|x - y|``) or 2 (cost ``|x - y|^2 / 2``).
        reach: ``None`` (balanced) or the unbalanced scale, ``rho = reach^p``.
        debias: the debiased divergence ``S`` (default) or the raw ``OT(α, β)``.
        scaling: ratio of successive blurs in the annealing, in (0, 1).
        eps: the target temperature instead of ``blur``.
        diameter: start of the annealing (``diameter^p``) for every problem; ``None``
            = per problem, the diagonal of the bounding box of its weighted points (for
            given costs: ``(p max C)^(1/p)`` over the real entries).
        mode: ``"annealed"`` (GeomLoss's iterations; one update per temperature) or
            ``"converged"`` (then continue at ``eps`` until the fixed-point residual,
            for balanced problems the relative L1 marginal violation of each plan, is
            ``<= tol``; a :class:`SinkhornConvergenceWarning` if ``max_iter`` runs out).
        grad: ``"envelope"`` (default; GeomLoss's: the last update differentiated with
            its inputs detached) or ``"implicit"`` (``mode="converged"`` only: the three
            converged problems are handed to :func:`sinkhorn_ot.sinkhorn` with
            ``grad="implicit"``, warm-started, and the value is assembled from theirs,
            so the gradients are those of the exact fixed points).
        tol, max_iter: stopping rule of ``mode="converged"``.
        store_cost: keep the stacked point-cloud cost (``4 B K^2`` entries, ``K =
            max(N, M)``) during the loop instead of recomputing it; ``None`` = while it
            has at most 2^24 entries. Memory is ``O((N + M) D)`` plus one cost block
            otherwise, gradients included.
        block_elements: entries of one cost block (:class:`sinkhorn_ot.PointCloud`).
        backend: where the loop's point-cloud half-steps run: ``"native"`` on the
            kernel :func:`sinkhorn_ot.ops.point_softmin` (CPU or CUDA), ``"torch"`` on
            torch's ops, ``"auto"`` on the kernel where it was measured faster (CPU,
            ``D <= 8``, except ``p=2`` in float32), else torch. Given costs and the
            last, differentiated update always run on torch; with ``grad="implicit"``
            the three final solves use this backend.

    Returns:
        ``(B,)`` values (a scalar for unbatched input), differentiable w.r.t. ``x``,
        ``y``, ``a``, ``b`` (see ``grad``; both are exact at convergence; for balanced
        problems the gradients w.r.t. ``a`` and ``b`` are defined up to a constant, as
        for :func:`sinkhorn_ot.sinkhorn`).

    Example:
        >>> import torch
        >>> from sinkhorn_ot import pad_points, sinkhorn_divergence
        >>> xs = [torch.randn(n, 2, dtype=torch.float64) for n in (30, 20)]
        >>> ys = [torch.randn(m, 2, dtype=torch.float64) for m in (15, 25)]
        >>> x, y, a, b = pad_points(xs, ys)
        >>> batch = sinkhorn_divergence(x, y, a, b, blur=0.1)
        >>> alone = sinkhorn_divergence(xs[1], ys[1], blur=0.1)
        >>> bool(torch.allclose(batch[1], alone, rtol=1e-12))
        True
    """
    p = args.check_p(p)
    blur = args.blur_and_eps(blur, eps, p)
    reach = args.positive_float("reach", reach, optional=True)
    scaling = args.check_scaling(scaling)
    diameter = args.positive_float("diameter", diameter, optional=True)
    mode = check_choice("mode", mode, MODES)
    grad = check_choice("grad", grad, GRADS)
    if grad == "implicit" and mode != "converged":
        raise ValueError(
            "sinkhorn_divergence(grad='implicit') needs mode='converged': the implicit "
            "gradient is that of a fixed point, and the annealed mode does not end at one"
        )
    check_choice("backend", backend, BACKENDS)
    tol = check_tol(tol)
    max_iter = check_int("max_iter", max_iter, 0)
    block_elements = check_int("block_elements", block_elements, 1)
    if not isinstance(debias, bool):
        raise TypeError(f"`debias` must be a bool, got {type(debias).__name__}")
    rho = None if reach is None else reach**p
    if isinstance(x, DenseCost):
        problem = _cost_problem(x, y, a, b, debias, p, diameter)
    else:
        problem = _point_problem(x, y, a, b, debias, p, store_cost, diameter, block_elements)
    a, b = problem.a, problem.b
    if rho is None:
        args.check_balanced_masses(a, b)
    table, lengths = epsilon_table(p, problem.diameters, blur, scaling, a.dtype)
    cost_kind, cost_scale = POINT_COST[p]
    loop = SymmetricLoop(
        problem.stack,
        table,
        lengths,
        rho,
        cost=cost_kind,
        scale=cost_scale,
        block_elements=block_elements,
        native=_native_half_steps(backend, problem.stack, a, cost_kind),
    )
    state = loop.anneal()
    target = torch.full_like(loop.table[:, :1], blur**p)
    if mode == "converged":
        state, _ = loop.converge(state, target, tol, max_iter)
    if grad == "implicit":
        value = implicit_value(
            problem.geometries(),
            state,
            a,
            b,
            eps=blur**p,
            rho=rho,
            debias=debias,
            tol=tol,
            max_iter=max_iter,
            backend=backend,
        )
        value = value.to(problem.dtype)
        return value if problem.batched else value[0]
    with torch.enable_grad():
        parts = loop.extrapolate(state, target, **problem.differentiable())
        value = divergence_value(parts, a, b, blur**p, rho, debias)
    value = value.to(problem.dtype)
    return value if problem.batched else value[0]


#: ``backend="auto"`` runs the half-steps on :func:`sinkhorn_ot.ops.point_softmin` for
#: point clouds of at most this dimension (on the CPU; see :func:`_native_half_steps`).
NATIVE_MAX_DIM = 8
#: ... and for the squared Euclidean cost in float32 when padding makes up at least this
#: share of the stacked pairs (the native kernel skips it, the torch half-step does not).
NATIVE_MIN_PADDING = 0.3


def _native_half_steps(backend: str, stack, ref: torch.Tensor, cost: str) -> bool:
    """Whether the loop runs on :func:`sinkhorn_ot.ops.point_softmin`.

    ``"auto"`` picks it where it was measured faster than the torch half-steps
    (docs/divergence.md): on the CPU, for ``D <= NATIVE_MAX_DIM``; for the squared
    Euclidean cost in float32, whose torch half-step (matrix products with the
    potential absorbed) is faster on equal-size clouds, only when at least
    ``NATIVE_MIN_PADDING`` of the stacked pairs are padding (ragged batches: the native
    kernel computes only the real pairs). Torch is faster for every cost at larger ``D``.
    On a GPU ``"auto"`` keeps torch until the CUDA kernel has been measured there.
    """
    if backend == "torch" or stack.cost is not None:
        return False
    if backend == "auto":
        if ref.device.type != "cpu" or stack.rows.shape[-1] > NATIVE_MAX_DIM:
            return False
        if cost == "sqeuclidean" and ref.dtype == torch.float32:
            if padding_share(stack) < NATIVE_MIN_PADDING:
                return False
    ok, reason = _build.availability(ref.device, ref.dtype)
    if backend == "native" and not ok:
        raise RuntimeError(f"sinkhorn_divergence(backend='native') is not available: {reason}")
    return ok


def padding_share(stack) -> float:
    """The share of the stacked ``(P B, K, K)`` pairs that involve a trailing padded
    point: what the native half-step skips."""
    rows, cols = kept_lengths(stack.row_weights), kept_lengths(stack.col_weights)
    size = stack.row_weights.shape[-1]
    real = float((rows * cols).sum())
    return 1.0 - real / max(1, rows.numel() * size * size)


class _Problem:
    """A checked divergence problem: its :class:`Stack`, weights ``(B, N)``, ``(B, M)``,
    diameters ``(B,)``; ``differentiable()`` gives the extrapolation's differentiable
    inputs, ``geometries()`` the three problems ``(xy, xx, yy)`` for ``grad="implicit"``.
    """

    def __init__(self, stack, a, b, diameters, batched, dtype, differentiable, geometries):
        self.stack, self.a, self.b, self.diameters = stack, a, b, diameters
        self.batched, self.dtype, self.differentiable = batched, dtype, differentiable
        self.geometries = geometries


def _point_problem(x, y, a, b, debias, p, store_cost, diameter, block_elements):
    x, y = args.check_points("x", x), args.check_points("y", y)
    args.check_pair(x, y)
    batched = x.dim() == 3
    dtype = x.dtype
    x = (x if batched else x.unsqueeze(0)).to(compute_dtype(dtype))
    y = (y if batched else y.unsqueeze(0)).to(x.dtype)
    batch, n, _ = x.shape
    a = args.check_weights("a", a, batch, n, batched, x)
    b = args.check_weights("b", b, batch, y.shape[1], batched, x)
    if diameter is None:
        diameters = bounding_diameters(x, y, a, b)
    else:
        diameters = torch.full((batch,), diameter, dtype=torch.float64)
    xc, yc = centred(x, y, a, b)
    kind, scale = POINT_COST[p]
    stack = stack_points(xc, yc, a, b, debias=debias, cost=kind, scale=scale, store=store_cost)

    def differentiable():
        return {"rows": stacked_rows(xc, yc, stack.parts)}

    def geometries():
        def cloud(rows, cols):
            return PointCloud(rows, cols, kind, scale=scale, block_elements=block_elements)

        selves = (cloud(xc, xc), cloud(yc, yc)) if debias else (None, None)
        return (cloud(xc, yc), *selves)

    return _Problem(stack, a, b, diameters, batched, dtype, differentiable, geometries)


def _cost_problem(C_xy, selves, a, b, debias, p, diameter):
    C = args.check_cost_matrix("x", C_xy, tuple(C_xy.C.shape))
    if C.dim() not in (2, 3):
        raise ValueError(f"`x` must hold a cost (N, M) or (B, N, M), got {tuple(C.shape)}")
    batched = C.dim() == 3
    dtype = C.dtype
    C = (C if batched else C.unsqueeze(0)).to(compute_dtype(dtype))
    batch, n, m = C.shape
    if debias:
        if not isinstance(selves, tuple | list) or len(selves) != 2:
            raise TypeError(
                "with a DenseCost `x` (C_xy) and debias=True, `y` must be the pair "
                f"(C_xx, C_yy) of self costs, got {type(selves).__name__}"
            )
        shape_xx, shape_yy = ((batch, n, n), (batch, m, m)) if batched else ((n, n), (m, m))
        C_xx = args.check_cost_matrix("y[0] (C_xx)", selves[0], shape_xx)
        C_yy = args.check_cost_matrix("y[1] (C_yy)", selves[1], shape_yy)
        C_xx = (C_xx if batched else C_xx.unsqueeze(0)).to(C.dtype)
        C_yy = (C_yy if batched else C_yy.unsqueeze(0)).to(C.dtype)
    elif selves is not None:
        raise TypeError(
            f"with a DenseCost `x` and debias=False, `y` must be None, got {type(selves).__name__}"
        )
    else:
        C_xx = C_yy = None
    ref = C.new_empty((batch, 1, 1))
    a = args.check_weights("a", a, batch, n, batched, ref)
    b = args.check_weights("b", b, batch, m, batched, ref)
    if diameter is None:
        real = (a > 0).unsqueeze(2) & (b > 0).unsqueeze(1)
        largest = torch.where(real, C.detach(), float("-inf")).amax(dim=(1, 2))
        if debias:
            for S, w in ((C_xx, a), (C_yy, b)):
                mask = (w > 0).unsqueeze(2) & (w > 0).unsqueeze(1)
                largest = torch.maximum(
                    largest, torch.where(mask, S.detach(), float("-inf")).amax(dim=(1, 2))
                )
        diameters = (p * largest.double().clamp_min(0)) ** (1.0 / p)
    else:
        diameters = torch.full((batch,), diameter, dtype=torch.float64)
    stack = stack_costs(C, C_xx, C_yy, a, b, debias=debias, differentiable=False)

    def differentiable():
        full = stack_costs(C, C_xx, C_yy, a, b, debias=debias, differentiable=True)
        return {"cost": full.cost}

    def geometries():
        return C, C_xx, C_yy

    return _Problem(stack, a, b, diameters, batched, dtype, differentiable, geometries)


class SinkhornLoss(torch.nn.Module):
    """The Sinkhorn divergence as a module: the drop-in for GeomLoss's ``SamplesLoss``.

    ``SinkhornLoss(blur=0.05, p=2, reach=None, debias=True, scaling=0.5)`` called as
    ``loss(x, y)`` or ``loss(a, x, b, y)`` (GeomLoss's two call forms) returns
    :func:`sinkhorn_divergence` with these options; every keyword of that function is
    accepted.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import SinkhornLoss
        >>> loss = SinkhornLoss(blur=0.1, scaling=0.9)
        >>> x = torch.randn(3, 20, 2, requires_grad=True)
        >>> value = loss(x, torch.randn(3, 30, 2)).sum()
        >>> value.backward()
        >>> x.grad.shape, bool(torch.isfinite(x.grad).all())
        (torch.Size([3, 20, 2]), True)
    """

    def __init__(
        self,
        blur: float | None = None,
        p: int = 2,
        reach: float | None = None,
        debias: bool = True,
        scaling: float = 0.5,
        **options,
    ):
        super().__init__()
        self.options = {
            "blur": blur,
            "p": p,
            "reach": reach,
            "debias": debias,
            "scaling": scaling,
            **options,
        }
        # Check the options now rather than at the first call.
        args.check_p(p)
        args.blur_and_eps(blur, options.get("eps"), p)
        args.positive_float("reach", reach, optional=True)
        args.check_scaling(scaling)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) == 2:
            x, y = inputs
            return sinkhorn_divergence(x, y, **self.options)
        if len(inputs) == 4:
            a, x, b, y = inputs
            return sinkhorn_divergence(x, y, a, b, **self.options)
        raise TypeError(f"SinkhornLoss takes (x, y) or (a, x, b, y), got {len(inputs)} arguments")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
