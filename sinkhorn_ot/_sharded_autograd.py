"""Implicit gradients of a solve whose rows are sharded over ranks.

The adjoint of :mod:`sinkhorn_ot.autograd_lazy` (conjugate gradients on the Schur
complement of the column side, with only products ``Q v`` and ``Q^T u``), where every
sum over rows is a sum over ranks:

* ``Q v`` ``(B, M) -> (B, N_r)`` is local (each rank's rows, replicated ``v``);
* ``Q^T u`` ``(B, N_r) -> (B, M)`` is each rank's partial product, all-reduced: one
  all-reduce of ``B * M`` numbers per CG iteration;
* the CG iterates live on the replicated column side, so every rank runs the same
  iterations and stops at the same one.

The gradients follow the convention of :mod:`sinkhorn_ot._collectives`: local inputs
(``x_local``, ``C_local``, ``a_local``) get their own slice, replicated ones (``y``,
``b``, ``eps``) the whole gradient on every rank.
"""

from __future__ import annotations

import torch

from .autograd import FIXED_POINT_SLACK, _schur_cg_products, first_order_only
from .autograd_lazy import BlockQ, _real_pairs
from .errors import ImplicitGradientError
from .geometry import DenseCost

_FAR = (
    "grad='implicit' with `group` needs a solve that ended at a fixed point (relative "
    "marginal violation <= {slack:g}); this one did not. Raise max_iter or eps, or use "
    "grad='envelope'"
)


class ShardedImplicitPotentials(torch.autograd.Function):
    """Identity on converged ``(f_local, g)``; backward: the sharded implicit adjoint.

    ``forward(local geometry, ranks, a (B,N_r), b (B,M), eps (B,), f (B,N_r), g (B,M),
    *tensors) -> (f, g)`` with ``tensors`` the geometry's own: ``(C_local,)`` or
    ``(x_local, y)``.
    """

    @staticmethod
    def forward(ctx, geometry, ranks, a, b, eps, f, g, *tensors):
        ctx.geometry, ctx.ranks = geometry, ranks
        ctx.save_for_backward(a, b, eps, f, g, *tensors)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        a, b, eps, f, g, *tensors = ctx.saved_tensors
        backward = ShardedImplicitPotentials.backward
        refused = first_order_only(backward, ctx, grad_f, grad_g, (a, b, eps, *tensors))
        if refused is not None:
            return refused
        ranks = ctx.ranks
        want_a, want_b, want_eps = ctx.needs_input_grad[2:5]
        want_tensors = ctx.needs_input_grad[7:]
        dense = isinstance(ctx.geometry, DenseCost)
        detached = [t.detach() for t in tensors]
        geometry = DenseCost(detached[0]) if dense else ctx.geometry.with_points(*detached)
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        Q = BlockQ(geometry, f, g, eps, a, b)
        r, c_share = Q.sums(b, a)  # Q b (local rows), this rank's share of Q^T a
        c = ranks.total(c_share)
        _check_fixed_point(ranks, r, c, a, b)
        lam_f, lam_g = sharded_adjoint(Q, ranks, a, b, grad_f, grad_g)
        u, v = lam_f / r, lam_g / c
        e = eps.unsqueeze(-1)
        grad_a = torch.where(a > 0, -e * Q.mv(v), 0) if want_a else None
        grad_b = torch.where(b > 0, -e * ranks.total(Q.rmv(u)), 0) if want_b else None
        grads = [torch.zeros_like(t) if w else None for t, w in zip(tensors, want_tensors)]
        row_mean, col_share = torch.zeros_like(f), torch.zeros_like(g)
        for i0, i1 in geometry.blocks():
            cost = geometry.cost_block(i0, i1)
            block = Q.block(i0, i1, cost)
            if want_eps:
                QL = block * (f[:, i0:i1].unsqueeze(2) + g.unsqueeze(1) - cost)
                row_mean[:, i0:i1] = torch.bmm(QL, b.unsqueeze(-1)).squeeze(-1)
                col_share += torch.bmm(a[:, i0:i1].unsqueeze(1), QL).squeeze(1)
            if any(want_tensors):
                # C̄ = Q (u b^T + a v^T) on real pairs (autograd.parameter_grads).
                weight = torch.bmm(
                    torch.stack((u[:, i0:i1], a[:, i0:i1]), -1), torch.stack((b, v), 1)
                )
                weight = weight * block * _real_pairs(a, b, i0, i1)
                if dense:
                    grads[0][:, i0:i1] = weight
                else:
                    gx, gy = geometry.cost_vjp(i0, i1, weight)
                    if grads[0] is not None:
                        grads[0] += gx
                    if grads[1] is not None:
                        grads[1] += gy
        if not dense and grads[1] is not None:  # y is replicated: every rank's rows
            grads[1] = ranks.total(grads[1])
        grad_eps = None
        if want_eps:
            col_mean = ranks.total(col_share)
            row_part = ranks.total((lam_f * (r.log() - row_mean / r / e)).sum(-1))
            grad_eps = -row_part - (lam_g * (c.log() - col_mean / c / e)).sum(-1)
        return (None, None, grad_a, grad_b, grad_eps, None, None, *grads)


def _check_fixed_point(ranks, r, c, a, b) -> None:
    """Refuse (on every rank alike) an adjoint linearised far from a fixed point.

    The single-process backward falls back to the last half-step's gradient there; the
    sharded one does not have that fallback yet and says so instead.
    """
    row_gap = ranks.total(torch.stack([(a * (r - 1).abs()).sum(-1), a.sum(-1)]))
    gap = row_gap[0] + (b * (c - 1).abs()).sum(-1)
    finite = ranks.maximum((~torch.isfinite(r).all()).to(torch.int32).reshape(1))[0] == 0
    finite = finite & bool(torch.isfinite(c).all())
    if not (bool(finite) and bool((gap <= FIXED_POINT_SLACK * row_gap[1]).all())):
        raise ImplicitGradientError(_FAR.format(slack=FIXED_POINT_SLACK))


def sharded_adjoint(Q: BlockQ, ranks, a, b, grad_f, grad_g):
    """``J^T λ = (grad_f, grad_g)`` at the fixed point, rows sharded; ``λ_f, λ_g``.

    :func:`sinkhorn_ot.autograd_lazy.adjoint_products` with the column side eliminated
    last (it is the replicated one) and sums over rows taken over ranks.
    """
    row_pad, col_pad = a == 0, b == 0
    rf = grad_f - a * Q.mv(torch.where(col_pad, grad_g, 0))
    rg = grad_g - b * ranks.total(Q.rmv(torch.where(row_pad, grad_f, 0)))
    rf = torch.where(row_pad, 0, rf)
    rg = torch.where(col_pad, 0, rg)

    def p_mv(v):  # P v = a * Q (b v): local rows
        return a * Q.mv(b * v)

    def p_rmv(u):  # P^T u = b * Q^T (a u): summed over ranks
        return b * ranks.total(Q.rmv(a * u))

    real_f, real_g = (a > 0).to(rf.dtype), (b > 0).to(rf.dtype)
    a_safe, b_safe = torch.where(a > 0, a, 1), torch.where(b > 0, b, 1)
    # Remove the rounding along H's null vector (1, -1), as autograd.consistent_system.
    sums = ranks.total(torch.stack([real_f.sum(-1), (rf * real_f).sum(-1)]))
    count = sums[0] + real_g.sum(-1)
    drift = ((sums[1] - (rg * real_g).sum(-1)) / count).unsqueeze(-1)
    rf, rg = rf - drift * real_f, rg + drift * real_g
    rhs = rg - p_rmv(rf / a_safe)
    mu_g = _schur_cg_products(p_mv, p_rmv, a_safe, b_safe, real_g, rhs)
    mu_f = (rf - p_mv(mu_g)) / a_safe * real_f
    lam_f = torch.where(row_pad, grad_f, a * mu_f)
    lam_g = torch.where(col_pad, grad_g, b * mu_g)
    return lam_f, lam_g


def sharded_implicit_potentials(geometry, ranks, a, b, eps, f, g):
    """``(f_local, g)`` carrying the sharded implicit gradients to the inputs."""
    tensors = (geometry.C,) if isinstance(geometry, DenseCost) else (geometry.x, geometry.y)
    return ShardedImplicitPotentials.apply(geometry, ranks, a, b, eps, f, g, *tensors)
