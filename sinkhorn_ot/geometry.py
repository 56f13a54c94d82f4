"""Geometries: what the solver needs to know about a problem's cost.

The Sinkhorn loop, the plan and the gradients only ever use a few operations of the
cost ``C (B, N, M)``: the soft-min of ``h_j - C_ij`` over rows and over columns (the
log-domain half-steps), the products with ``exp(-C / eps)`` (the kernel form), the
cost scale (``method="auto"`` and ``eps_scaling``), and blocks of ``C`` to build plan
products and gradients. A geometry supplies exactly those, so the rest of the library
does not care whether ``C`` is stored (:class:`DenseCost`) or computed on the fly from
two point clouds (:class:`PointCloud`, memory ``O((N + M) D)``), in the spirit of
OTT-JAX's ``Geometry`` and GeomLoss's ``softmin``.

Example:
    >>> import torch
    >>> from sinkhorn_ot import PointCloud, sinkhorn
    >>> x, y = torch.randn(2, 50, 3), torch.randn(2, 40, 3)
    >>> res = sinkhorn(PointCloud(x, y), eps=0.5)
    >>> res.plan.shape, type(res.plan).__name__
    (torch.Size([2, 50, 40]), 'LazyPlan')
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from . import costs as cost_builders
from ._updates import KernelStep, LogStep, damped

#: Point-cloud costs and the builder of one block of each (on centred points).
POINT_COSTS = ("sqeuclidean", "euclidean", "cosine")
#: A log weight that stands for log 0 but keeps log-sum-exps finite (see BlockLogStep).
_FAR_BELOW = {
    t: -0.25 * torch.finfo(t).max
    for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
#: Default budget of one cost block, in elements (``B * rows * M``): 16 MiB in float32.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


class Geometry:
    """The interface of a problem's cost; see :class:`DenseCost` and :class:`PointCloud`.

    Attributes:
        batched: whether the user passed a batch (outputs keep the batch dimension).
        shape: ``(B, N, M)``, always batched.
        dtype, device: of the cost.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import Geometry, PointCloud
        >>> geometry = PointCloud(torch.randn(2, 5, 3), torch.randn(2, 4, 3))
        >>> isinstance(geometry, Geometry), geometry.shape, geometry.dense().shape
        (True, (2, 5, 4), torch.Size([2, 5, 4]))
    """

    batched: bool
    shape: tuple[int, int, int]

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def log_step(self, log_a, log_b, eps, damping=None):
        """Log-domain half-steps ``row(g)``/``col(f)`` for ``eps (B, 1)``; ``damping``
        ``(tau_a, tau_b)`` multiplies the soft-mins of unbalanced problems."""
        raise NotImplementedError

    def kernel_step(self, log_a, log_b, eps, damping=None):
        """Kernel-form half-steps (products with ``exp(-C / eps)``) for ``eps (B, 1)``."""
        raise NotImplementedError

    def scale(self) -> torch.Tensor:
        """``max_ij |C_ij|`` per problem, ``(B,)``: the start of ``eps_scaling``."""
        raise NotImplementedError

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges ``[i0, i1)`` whose cost blocks fit the memory budget."""
        raise NotImplementedError

    def cost_block(self, i0: int, i1: int) -> torch.Tensor:
        """``C[:, i0:i1, :]``, ``(B, i1 - i0, M)``, differentiable w.r.t. the inputs."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The whole cost ``(B, N, M)`` (materialised for a point cloud)."""
        return torch.cat([self.cost_block(i0, i1) for i0, i1 in self.blocks()], dim=1)

    def detach(self) -> Geometry:
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> Geometry:
        """The problems ``index`` of the batch, as a geometry of their own."""
        raise NotImplementedError


class DenseCost(Geometry):
    """A stored cost tensor: today's behaviour of ``sinkhorn(C, ...)``.

    Args:
        C: ``(N, M)`` or ``(B, N, M)``, floating.

    Example:
        >>> import torch
        >>> from sinkhorn_ot import DenseCost, sinkhorn
        >>> C = torch.rand(3, 4, dtype=torch.float64)
        >>> bool(torch.equal(sinkhorn(DenseCost(C), eps=0.1).plan, sinkhorn(C, eps=0.1).plan))
        True
    """

    def __init__(self, C: torch.Tensor):
        if not isinstance(C, torch.Tensor):
            raise TypeError(f"`C` must be a torch.Tensor, got {type(C).__name__}")
        self.C = C
        self.batched = C.dim() == 3
        self.shape = tuple((C if self.batched else C.unsqueeze(0)).shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.C.dtype

    @property
    def device(self) -> torch.device:
        return self.C.device

    def log_step(self, log_a, log_b, eps, damping=None):
        return LogStep(self.C, log_a, log_b, eps, damping)

    def kernel_step(self, log_a, log_b, eps, damping=None):
        return KernelStep(self.C, log_a, log_b, eps, damping)

    def scale(self) -> torch.Tensor:
        return self.C.detach().abs().amax(dim=(1, 2))

    def blocks(self) -> Iterator[tuple[int, int]]:
        yield 0, self.shape[1]

    def cost_block(self, i0: int, i1: int) -> torch.Tensor:
        return self.C[:, i0:i1]

    def dense(self) -> torch.Tensor:
        return self.C

    def detach(self) -> DenseCost:
        return DenseCost(self.C.detach())

    def select(self, index: torch.Tensor) -> DenseCost:
        return DenseCost(self.C[index])


class PointCloud(Geometry):
    """Two point clouds whose cost is computed on the fly, never stored.

    ``C_ij = scale * c(x_i, y_j)`` with ``c`` one of

    * ``"sqeuclidean"``: ``|x_i - y_j|^2`` (GeomLoss's ``p=2`` cost ``|x - y|^2 / 2`` is
      ``scale=0.5``; OTT-JAX's ``PointCloud`` default and POT's ``metric="sqeuclidean"``
      are ``scale=1``);
    * ``"euclidean"``: ``|x_i - y_j|`` (GeomLoss ``p=1``, POT ``metric="euclidean"``);
    * ``"cosine"``: ``1 - cos(x_i, y_j)`` (norms floored at 1e-8, as
      :func:`sinkhorn_ot.costs.cosine`).

    Memory is ``O((N + M) D)`` on the native backends; the torch backend works on row
    blocks of at most ``block_elements`` entries (``B * rows * M``). Zero weights mark
    padding exactly as for a dense cost (:func:`pad_points` builds such batches).

    Args:
        x: ``(N, D)`` or ``(B, N, D)``, floating.
        y: ``(M, D)`` or ``(B, M, D)``, same dtype, device and batch as ``x``.
        cost: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        scale: positive factor of the cost.
        block_elements: entries of one cost block on the torch backend (memory budget).

    Example:
        >>> import torch
        >>> from sinkhorn_ot import PointCloud, sinkhorn, sqeuclidean
        >>> x, y = torch.randn(30, 2, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
        >>> lazy = sinkhorn(PointCloud(x, y), eps=0.5, tol=1e-9)
        >>> dense = sinkhorn(sqeuclidean(x, y), eps=0.5, tol=1e-9)
        >>> bool(torch.allclose(lazy.f, dense.f)), bool(torch.allclose(lazy.plan.to_dense(), dense.plan))
        (True, True)
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        cost: str = "sqeuclidean",
        *,
        scale: float = 1.0,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ):
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"`{name}` must be a floating tensor, got dtype {t.dtype}")
            if t.dim() not in (2, 3):
                raise ValueError(
                    f"`{name}` must have shape (N, D) or (B, N, D), got {tuple(t.shape)}"
                )
        if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
            raise ValueError(
                "`x` and `y` must share the batch size and the dimension D: expected "
                f"(B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.dtype != y.dtype or x.device != y.device:
            raise ValueError(
                f"`x` and `y` must share dtype and device, got ({x.dtype}, {x.device}) and "
                f"({y.dtype}, {y.device})"
            )
        if x.shape[-2] == 0 or y.shape[-2] == 0 or (x.dim() == 3 and x.shape[0] == 0):
            raise ValueError(
                f"`x` and `y` must hold at least one point, got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        if not isinstance(cost, str) or cost not in POINT_COSTS:
            options = ", ".join(repr(c) for c in POINT_COSTS)
            raise ValueError(f"`cost` must be one of {options}, got {cost!r}")
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise TypeError(f"`scale` must be a positive float, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"`scale` must be a positive finite float, got {scale}")
        if isinstance(block_elements, bool) or not isinstance(block_elements, int):
            raise TypeError(
                f"`block_elements` must be a positive int, got {type(block_elements).__name__}"
            )
        if block_elements < 1:
            raise ValueError(f"`block_elements` must be >= 1, got {block_elements}")
        self.batched = x.dim() == 3
        self.x = x if self.batched else x.unsqueeze(0)  # (B, N, D)
        self.y = y if self.batched else y.unsqueeze(0)  # (B, M, D)
        self.cost = cost
        self.cost_scale = float(scale)
        self.block_elements = block_elements
        batch, n, _ = self.x.shape
        self.shape = (batch, n, self.y.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def with_points(self, x: torch.Tensor, y: torch.Tensor) -> PointCloud:
        """The same cost on other (batched) points, e.g. converted or detached ones."""
        out = PointCloud.__new__(PointCloud)
        out.__dict__.update(self.__dict__)
        out.x, out.y = x, y
        return out

    def detach(self) -> PointCloud:
        return self.with_points(self.x.detach(), self.y.detach())

    def select(self, index: torch.Tensor) -> PointCloud:
        out = self.with_points(self.x[index], self.y[index])
        out.shape = (len(index), *self.shape[1:])
        padding = getattr(self, "_padding", None)
        if padding is not None:
            out._padding = (padding[0][index], padding[1][index])
        return out

    def centred_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x - c``, ``y - c`` with ``c`` the (detached) mean of ``y`` per problem.

        The squared and plain Euclidean costs are translation invariant, and the
        expanded formula ``|x|^2 + |y|^2 - 2 x.y`` loses digits to cancellation when the
        clouds sit far from the origin: centring removes that (the gradients are exact,
        since the cost does not change). The cosine cost is not centred.
        """
        if self.cost == "cosine":
            return self.x, self.y
        centre = self.y.detach().mean(dim=1, keepdim=True)  # (B, 1, D)
        return self.x - centre, self.y - centre

    def blocks(self) -> Iterator[tuple[int, int]]:
        batch, n, m = self.shape
        rows = max(1, self.block_elements // max(1, batch * m))
        for i0 in range(0, n, rows):
            yield i0, min(n, i0 + rows)

    def cost_block(self, i0: int, i1: int) -> torch.Tensor:
        x, y = self.centred_points()
        block = self.cost_of(x[:, i0:i1], y)
        padding = getattr(self, "_padding", None)
        if padding is not None and block.requires_grad:
            real_rows, real_cols = padding
            real = real_rows[:, i0:i1].unsqueeze(2) & real_cols.unsqueeze(1)
            block = torch.where(real, block, block.detach())
        return block

    def without_padding_gradient(self, a: torch.Tensor, b: torch.Tensor) -> PointCloud:
        """The same cost; under autograd no gradient reaches entries of padded rows or
        columns (zero weights), as ``sinkhorn`` does for a dense cost."""
        out = self.with_points(self.x, self.y)
        out._padding = (a > 0, b > 0)
        return out

    def cost_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``scale * c(x_i, y_j)``, ``(B, n, m)`` for ``x (B, n, D)``, ``y (B, m, D)``."""
        builder = getattr(cost_builders, self.cost)
        block = builder(x, y)
        return block if self.cost_scale == 1.0 else block * self.cost_scale

    def cost_vjp(self, i0: int, i1: int, weight: torch.Tensor):
        """``(sum_ij W_ij dC_ij/dx, sum_ij W_ij dC_ij/dy)`` for one block ``W (B, i1-i0, M)``.

        The gradient a cost block of weights ``W`` sends to the points, without
        forming anything larger than the block. Returns ``(B, N, D)``, ``(B, M, D)``.
        """
        with torch.enable_grad():
            x = self.x.detach().requires_grad_(True)
            y = self.y.detach().requires_grad_(True)
            block = self.with_points(x, y).cost_block(i0, i1)
            grad_x, grad_y = torch.autograd.grad(block, (x, y), weight)
        return grad_x, grad_y

    def scale(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [self.cost_block(i0, i1).abs().amax(dim=(1, 2)) for i0, i1 in self.blocks()]
            ).amax(0)

    def log_step(self, log_a, log_b, eps, damping=None):
        return BlockLogStep(self, log_a, log_b, eps, damping)

    def kernel_step(self, log_a, log_b, eps, damping=None):
        return BlockKernelStep(self, log_a, log_b, eps, damping)


class BlockLogStep:
    """Log-domain half-steps of a geometry, one row block of the cost at a time.

    Same maps as :class:`sinkhorn_ot._updates.LogStep`; the column soft-min combines the
    per-block log-sum-exps with ``logaddexp``.
    """

    def __init__(self, geometry: Geometry, log_a, log_b, eps, damping=None):
        self.geometry, self.log_a, self.log_b, self.eps = geometry, log_a, log_b, eps
        self.damping = damping

    def row(self, g: torch.Tensor) -> torch.Tensor:
        return damped(-self.eps * self.row_lse(g), self.damping, 0)  # (B, N)

    def row_lse(self, g: torch.Tensor) -> torch.Tensor:
        """``log sum_j b_j exp((g_j - C_ij) / eps)`` over this geometry's columns, ``(B, N)``."""
        h = (self.log_b + g / self.eps).unsqueeze(1)  # (B, 1, M)
        e = self.eps.unsqueeze(-1)
        parts = [
            torch.logsumexp(h - self.geometry.cost_block(i0, i1) / e, dim=2)
            for i0, i1 in self.geometry.blocks()
        ]
        return torch.cat(parts, dim=1)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        return damped(-self.eps * self.col_lse(f), self.damping, 1)  # (B, M)

    def col_lse(self, f: torch.Tensor) -> torch.Tensor:
        """``log sum_i a_i exp((f_i - C_ij) / eps)`` over this geometry's rows, ``(B, M)``
        (as :meth:`sinkhorn_ot._updates.LogStep.col_lse`)."""
        k = (self.log_a + f / self.eps).unsqueeze(2)  # (B, N, 1)
        # A block whose rows are all padding (log a = -inf) has a log-sum-exp of -inf,
        # whose gradient is NaN (0 / 0) under grad="unroll". A huge finite log weight
        # instead gives the same exactly-zero terms and a finite (zero) gradient.
        k = k.clamp_min(_FAR_BELOW[k.dtype])
        e = self.eps.unsqueeze(-1)
        total = None
        for i0, i1 in self.geometry.blocks():
            part = torch.logsumexp(k[:, i0:i1] - self.geometry.cost_block(i0, i1) / e, dim=1)
            total = part if total is None else torch.logaddexp(total, part)
        return total


class BlockKernelStep:
    """Kernel-form half-steps of a geometry on row blocks of ``exp(-C / eps)``.

    Same maps (and the same underflow to a non-finite potential) as
    :class:`sinkhorn_ot._updates.KernelStep`.
    """

    def __init__(self, geometry: Geometry, log_a, log_b, eps, damping=None):
        self.geometry, self.log_a, self.log_b, self.eps = geometry, log_a, log_b, eps
        self.damping = damping

    def _kernel(self, i0, i1):
        return torch.exp(-self.geometry.cost_block(i0, i1) / self.eps.unsqueeze(-1))

    def row(self, g: torch.Tensor) -> torch.Tensor:
        v = torch.exp(self.log_b + g / self.eps).unsqueeze(-1)  # (B, M, 1)
        parts = [
            torch.bmm(self._kernel(i0, i1), v).squeeze(-1) for i0, i1 in self.geometry.blocks()
        ]
        return damped(-self.eps * torch.log(torch.cat(parts, dim=1)), self.damping, 0)

    def col(self, f: torch.Tensor) -> torch.Tensor:
        u = torch.exp(self.log_a + f / self.eps).unsqueeze(1)  # (B, 1, N)
        total = None
        for i0, i1 in self.geometry.blocks():
            part = torch.bmm(u[:, :, i0:i1], self._kernel(i0, i1)).squeeze(1)  # (B, M)
            total = part if total is None else total + part
        return damped(-self.eps * torch.log(total), self.damping, 1)


def as_geometry(C: object) -> Geometry:
    """A geometry for ``sinkhorn``'s first argument: a tensor becomes :class:`DenseCost`."""
    if isinstance(C, Geometry):
        return C
    if isinstance(C, torch.Tensor):
        return DenseCost(C)
    raise TypeError(
        f"`C` must be a torch.Tensor cost or a geometry (DenseCost, PointCloud), "
        f"got {type(C).__name__}"
    )
