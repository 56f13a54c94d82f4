"""Matrix-free gradients for geometries whose cost is not stored (point clouds).

The same mathematics as :mod:`sinkhorn_ot.autograd` (implicit function theorem at the
fixed point, envelope theorem), with every use of ``Q_ij = exp((f_i + g_j - C_ij) / eps)``
turned into a product computed one row block of the cost at a time:

* the adjoint ``H μ = x̄`` is solved by conjugate gradients on the Schur complement,
  using only ``P v`` and ``P^T u`` (never a dense ``Q``);
* the cost's gradient ``C̄_ij = Q_ij (u_i b_j + a_i v_j)`` is never formed either: each
  block of it is contracted at once with the Jacobian of that block of the cost w.r.t.
  the points (:meth:`sinkhorn_ot.geometry.PointCloud.cost_vjp`).

Memory is a few row blocks plus ``O((N + M) D)``. Pairs of two padded points (zero
weights on both sides) are left out of every product: their ``Q`` can overflow at small
eps and they carry no mass, and padded points get exactly zero gradient, as padded cost
entries do for a dense cost.
"""

from __future__ import annotations

import torch

from .autograd import (
    _merge_per_problem,
    _off_fixed_point,
    _schur_cg_products,
    consistent_system,
    first_order_only,
    fixed_point_kernel,
    last_half_step_grads,
)


class BlockQ:
    """Products with ``Q = exp((f ⊕ g - C) / eps)`` of a geometry, block by block.

    Args:
        geometry: batched ``(B, N, M)`` (points detached).
        f: ``(B, N)``; g: ``(B, M)``; eps: ``(B,)``; a: ``(B, N)``; b: ``(B, M)``.
    """

    def __init__(self, geometry, f, g, eps, a, b, keep=None):
        self.geometry, self.f, self.g, self.a, self.b, self.eps = geometry, f, g, a, b, eps
        self.keep = None if keep is None else keep.view(-1, 1, 1)  # (B,) problems kept

    def block(self, i0: int, i1: int, cost: torch.Tensor | None = None) -> torch.Tensor:
        """``Q[:, i0:i1]``, zero where both the row and the column are padding."""
        cost = self.geometry.cost_block(i0, i1) if cost is None else cost
        a, f = self.a[:, i0:i1], self.f[:, i0:i1]
        Q = fixed_point_kernel(cost, a, self.b, self.eps, f, self.g)
        return Q if self.keep is None else torch.where(self.keep, Q, 0)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """``Q v``: ``(B, M) -> (B, N)``."""
        parts = [
            torch.bmm(self.block(i0, i1), v.unsqueeze(-1)).squeeze(-1)
            for i0, i1 in self.geometry.blocks()
        ]
        return torch.cat(parts, dim=1)

    def sums(self, v: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q v, Q^T u)`` in one pass over the blocks: ``(B, N)``, ``(B, M)``."""
        rows, total = [], 0
        for i0, i1 in self.geometry.blocks():
            block = self.block(i0, i1)
            rows.append(torch.bmm(block, v.unsqueeze(-1)).squeeze(-1))
            total = total + torch.bmm(u[:, i0:i1].unsqueeze(1), block).squeeze(1)
        return torch.cat(rows, dim=1), total

    def rmv(self, u: torch.Tensor) -> torch.Tensor:
        """``Q^T u``: ``(B, N) -> (B, M)``."""
        total = 0
        for i0, i1 in self.geometry.blocks():
            total = total + torch.bmm(u[:, i0:i1].unsqueeze(1), self.block(i0, i1)).squeeze(1)
        return total


def adjoint_products(Q: BlockQ, a, b, grad_f, grad_g):
    """``J^T λ = (grad_f, grad_g)`` at the fixed point by CG; returns ``λ_f, λ_g``.

    The matrix-free twin of :func:`sinkhorn_ot.autograd.adjoint`.
    """
    row_pad, col_pad = a == 0, b == 0
    rf = grad_f - a * Q.mv(torch.where(col_pad, grad_g, 0))
    rg = grad_g - b * Q.rmv(torch.where(row_pad, grad_f, 0))
    rf = torch.where(row_pad, 0, rf)
    rg = torch.where(col_pad, 0, rg)

    def p_mv(v):  # P v = a * Q (b v)
        return a * Q.mv(b * v)

    def p_rmv(u):  # P^T u = b * Q^T (a u)
        return b * Q.rmv(a * u)

    if a.shape[1] >= b.shape[1]:
        mu_f, mu_g = _solve_h_products(p_mv, p_rmv, a, b, rf, rg)
    else:
        mu_g, mu_f = _solve_h_products(p_rmv, p_mv, b, a, rg, rf)
    lam_f = torch.where(row_pad, grad_f, a * mu_f)
    lam_g = torch.where(col_pad, grad_g, b * mu_g)
    return lam_f, lam_g


def _solve_h_products(p_mv, p_rmv, a, b, rf, rg):
    """``[[diag(a), P], [P^T, diag(b)]] (μf, μg) = (rf, rg)`` on the real entries, by CG
    on the Schur complement of the ``b`` side (as :func:`sinkhorn_ot.autograd._solve_h`)."""
    real_f, real_g, a_safe, b_safe, rf, rg = consistent_system(a, b, rf, rg)
    rhs = rg - p_rmv(rf / a_safe)  # (B, M)
    mu_g = _schur_cg_products(p_mv, p_rmv, a_safe, b_safe, real_g, rhs)
    mu_f = (rf - p_mv(mu_g)) / a_safe
    return mu_f * real_f, mu_g


def _real_pairs(a, b, i0, i1):
    return ((a[:, i0:i1] > 0).unsqueeze(2) & (b > 0).unsqueeze(1)).to(a.dtype)


class ImplicitPointPotentials(torch.autograd.Function):
    """Identity on converged ``(f, g)`` of a point cloud; backward: the matrix-free adjoint.

    ``forward(geometry, a (B,N), b (B,M), eps (B,), f (B,N), g (B,M), x (B,N,D),
    y (B,M,D)) -> (f, g)``; ``geometry`` is the (non-tensor) point cloud of ``x, y``.
    """

    @staticmethod
    def forward(ctx, geometry, a, b, eps, f, g, x, y):
        ctx.geometry = geometry
        ctx.save_for_backward(a, b, eps, f, g, x, y)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        a, b, eps, f, g, x, y = ctx.saved_tensors
        refused = first_order_only(
            ImplicitPointPotentials.backward, ctx, grad_f, grad_g, (a, b, eps, x, y)
        )
        if refused is not None:
            return refused
        want_a, want_b, want_eps = ctx.needs_input_grad[1:4]
        want_x, want_y = ctx.needs_input_grad[6:8]
        geometry = ctx.geometry.with_points(x.detach(), y.detach())
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        Q = BlockQ(geometry, f, g, eps, a, b)
        r, c = Q.sums(b, a)  # (B, N), (B, M): Q b and Q^T a, about 1 at a fixed point
        off = _off_fixed_point(r, c, a, b)
        wanted = (want_x, want_y, want_a, want_b, want_eps)
        fallback = None
        if bool(off.any()):  # solves that stopped far from a fixed point (autograd.py)
            fallback = last_half_step_grads(geometry, a, b, eps, f, grad_g, wanted, tensors=(x, y))
            keep = ~off
            Q = BlockQ(geometry, f, g, eps, a, b, keep=keep)
            r = torch.where(keep.unsqueeze(-1), r, 1)
            c = torch.where(keep.unsqueeze(-1), c, 1)
            grad_f = torch.where(keep.unsqueeze(-1), grad_f, 0)
            grad_g = torch.where(keep.unsqueeze(-1), grad_g, 0)
        lam_f, lam_g = adjoint_products(Q, a, b, grad_f, grad_g)
        grads = point_parameter_grads(geometry, Q, a, b, eps, f, g, r, c, lam_f, lam_g, wanted)
        grad_x, grad_y, grad_a, grad_b, grad_eps = grads
        if fallback is not None:
            merged = [
                _merge_per_problem(off, regular, other)
                for regular, other in zip((grad_x, grad_y, grad_a, grad_b, grad_eps), fallback)
            ]
            grad_x, grad_y, grad_a, grad_b, grad_eps = merged
        return None, grad_a, grad_b, grad_eps, None, None, grad_x, grad_y


def point_parameter_grads(geometry, Q, a, b, eps, f, g, r, c, lam_f, lam_g, wanted):
    """``(x̄, ȳ, ā, b̄, eps̄)`` of :func:`sinkhorn_ot.autograd.parameter_grads`, block-wise.

    ``Q`` is the :class:`BlockQ` of the solution, ``r = Q b``, ``c = Q^T a``, ``λ`` the
    adjoint's solution and ``wanted`` five bools (``x, y, a, b, eps``); the cost's
    gradient is contracted with the Jacobian of each block of the cost at once.
    """
    want_x, want_y, want_a, want_b, want_eps = wanted
    x, y = geometry.x, geometry.y
    u, v = lam_f / r, lam_g / c
    e = eps.unsqueeze(-1)
    grad_a = torch.where(a > 0, -e * Q.mv(v), 0) if want_a else None
    grad_b = torch.where(b > 0, -e * Q.rmv(u), 0) if want_b else None
    grad_x = torch.zeros_like(x) if want_x else None
    grad_y = torch.zeros_like(y) if want_y else None
    row_mean = torch.zeros_like(f)
    col_mean = torch.zeros_like(g)
    for i0, i1 in geometry.blocks():
        cost = geometry.cost_block(i0, i1)
        Qb = Q.block(i0, i1, cost)
        if want_eps:
            QL = Qb * (f[:, i0:i1].unsqueeze(2) + g.unsqueeze(1) - cost)
            row_mean[:, i0:i1] = torch.bmm(QL, b.unsqueeze(-1)).squeeze(-1)
            col_mean += torch.bmm(a[:, i0:i1].unsqueeze(1), QL).squeeze(1)
        if want_x or want_y:
            # C̄ = Q (u b^T + a v^T) on real pairs, contracted with dC/d(points) at once.
            weight = torch.bmm(torch.stack((u[:, i0:i1], a[:, i0:i1]), -1), torch.stack((b, v), 1))
            weight = weight * Qb * _real_pairs(a, b, i0, i1)
            gx, gy = geometry.cost_vjp(i0, i1, weight)
            if want_x:
                grad_x += gx
            if want_y:
                grad_y += gy
    grad_eps = None
    if want_eps:
        grad_eps = -(lam_f * (r.log() - row_mean / r / e)).sum(-1)
        grad_eps = grad_eps - (lam_g * (c.log() - col_mean / c / e)).sum(-1)
    return grad_x, grad_y, grad_a, grad_b, grad_eps


class PlanCostPairing(torch.autograd.Function):
    """Zero in value; its gradient w.r.t. the points is ``sum_ij P_ij dC_ij``.

    ``forward(plan, x, y) -> zeros (B,)`` with ``plan`` a detached
    :class:`~sinkhorn_ot.plan.LazyPlan` of the point cloud of ``x, y``: the envelope
    theorem's ``dV/dC = P``, contracted with the cost's Jacobian block by block.
    """

    @staticmethod
    def forward(ctx, plan, x, y):
        ctx.plan = plan
        ctx.save_for_backward(x, y)
        return x.new_zeros(x.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, y = ctx.saved_tensors
        plan = ctx.plan
        geometry = plan.geometry.with_points(x.detach(), y.detach())
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        grad_y = torch.zeros_like(y) if ctx.needs_input_grad[2] else None
        for i0, i1 in geometry.blocks():
            weight = plan.block(i0, i1) * _real_pairs(plan.a, plan.b, i0, i1)
            gx, gy = geometry.cost_vjp(i0, i1, weight * grad_out.view(-1, 1, 1))
            if grad_x is not None:
                grad_x += gx
            if grad_y is not None:
                grad_y += gy
        return None, grad_x, grad_y
