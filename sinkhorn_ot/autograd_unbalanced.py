"""Gradients of unbalanced problems (relaxed marginals): implicit adjoint and envelope.

Implicit. With the damping ``tau = rho / (rho + eps)`` of each side the fixed point is
``f = tau_a row(g)``, ``g = tau_b col(f)``; we differentiate the equivalent residuals

    F_f = f / tau_a - row(g) = eps log r + eps f / rho_a,   r_i = sum_j b_j Q_ij
    F_g = g / tau_b - col(f) = eps log c + eps g / rho_b,   c_j = sum_i a_i Q_ij

(``Q_ij = exp((f_i + g_j - C_ij) / eps)``; ``1 / rho = 0`` on a hard side). Their
Jacobian is ``D^{-1} H`` with ``D = diag(a r, b c)`` and the symmetric

    H = [[diag(P 1) / tau_a, P], [P^T, diag(P^T 1) / tau_b]],

the balanced system of :mod:`sinkhorn_ot.autograd` with the plan's own marginals over
the damping on the diagonal. A relaxed side makes ``H`` positive definite: no null
space, no pin, no projection. In a batch that mixes balanced and relaxed problems the
balanced ones keep both (their diagonal ``P 1, P^T 1`` makes ``(1, -1)`` an exact null
vector). The parameter gradients are those of :func:`sinkhorn_ot.autograd.parameter_grads`
plus the terms of ``eps f / rho``: ``eps̄ -= <λ_f, f / rho_a> + <λ_g, g / rho_b>`` and,
for ``s = 1 / rho``, ``s̄_a = -eps <λ_f, f>`` (autograd carries ``s̄`` to ``rho``).

Envelope. The value is the dual objective ``D(f, g)`` at its maximiser, so (Danskin)
``dV/dC = P``, ``dV/deps = KL(P | a b^T)`` (generalised), ``dV/da_i = phi_a(f_i) - eps
((P 1)_i / a_i - sum b)`` with ``phi(f) = rho (1 - exp(-f / rho))`` (``f`` on a hard
side) and ``dV/drho_a = KL(P 1 | a)``.
"""

from __future__ import annotations

import torch

from . import _unbalanced as ub
from .autograd import (
    DENSE_MAX,
    _merge_per_problem,
    _off_fixed_point,
    _schur_cg_products,
    _solve_scaled_dense,
    consistent_system,
    first_order_only,
    fixed_point_kernel,
    last_half_step_grads,
    parameter_grads,
)
from .geometry import DenseCost


def implicit_relaxed_potentials(geometry, a, b, eps, f, g, rho):
    """``(f, g)`` with implicit-function gradients for a batch with relaxed marginals.

    Args:
        geometry: :class:`DenseCost` or :class:`PointCloud`, batched ``(B, N, M)``.
        a, f: ``(B, N)``; b, g: ``(B, M)``; eps: ``(B,)``; rho: ``(B, 2)`` (``inf`` =
            hard), gradients reach it through ``1 / rho``.
    """
    inv_rho = ub.inverse(rho)
    if isinstance(geometry, DenseCost):
        return ImplicitRelaxedPotentials.apply(geometry.C, a, b, eps, inv_rho, f, g)
    return ImplicitRelaxedPointPotentials.apply(
        geometry, a, b, eps, inv_rho, f, g, geometry.x, geometry.y
    )


class Products:
    """``Q v``, ``Q^T u`` and both at once, of a dense ``Q (B, N, M)``."""

    def __init__(self, Q):
        self.Q = Q

    def mv(self, v):
        return torch.bmm(self.Q, v.unsqueeze(-1)).squeeze(-1)

    def rmv(self, u):
        return torch.bmm(u.unsqueeze(1), self.Q).squeeze(1)

    def sums(self, v, u):
        return self.mv(v), self.rmv(u)


def fixed_point_sums(Q, a, b, f, g, inv_rho):
    """``r = Q b``, ``c = Q^T a`` and which problems are far from a fixed point ``(B,)``.

    At a fixed point ``r exp(f / rho_a) = 1`` and ``c exp(g / rho_b) = 1`` (``r = c = 1``
    on hard sides): the test of :func:`sinkhorn_ot.autograd.far_from_fixed_point` on those.
    """
    r, c = Q.sums(b, a)
    r_fix = r * torch.exp(f * inv_rho[:, :1])
    c_fix = c * torch.exp(g * inv_rho[:, 1:])
    return r, c, _off_fixed_point(r_fix, c_fix, a, b)


def relaxed_adjoint(Q, a, b, r, c, tau_a, tau_b, pinned, grad_f, grad_g, dense=None):
    """Solve ``J^T λ = (grad_f, grad_g)`` of the damped fixed point; returns ``λ_f, λ_g``.

    Args:
        Q: products with ``Q`` (:class:`Products` or a block-wise equivalent).
        r, c: ``Q b (B, N)``, ``Q^T a (B, M)``.
        tau_a, tau_b: ``(B, 1)`` damping; pinned: ``(B, 1)``, 1 for balanced problems.
        dense: the plan ``P (B, N, M)`` for a dense factorisation, or ``None`` (CG).
    """
    row_pad, col_pad = a == 0, b == 0
    r_safe = torch.where(r > 0, r, 1)
    c_safe = torch.where(c > 0, c, 1)
    # Padded rows / columns: J^T has diag(1 / tau) there, so λ = tau x̄; their coupling
    # to the real equations moves to the right-hand side.
    lam_pad_f = torch.where(row_pad, tau_a * grad_f, 0)
    lam_pad_g = torch.where(col_pad, tau_b * grad_g, 0)
    rf = grad_f - a * Q.mv(lam_pad_g / c_safe)
    rg = grad_g - b * Q.rmv(lam_pad_f / r_safe)
    real_f, real_g, _, _, rf, rg = consistent_system(a, b, rf, rg, pinned)
    rf, rg = rf * real_f, rg * real_g
    diag_f = torch.where(a > 0, a * r_safe / tau_a, 1)
    diag_g = torch.where(b > 0, b * c_safe / tau_b, 1)
    if a.shape[1] >= b.shape[1]:
        mu_f, mu_g = _solve(Q, a, b, diag_f, diag_g, real_f, real_g, rf, rg, pinned, dense)
    else:
        dense_t = None if dense is None else dense.transpose(1, 2)
        flipped = _Transposed(Q)
        mu_g, mu_f = _solve(flipped, b, a, diag_g, diag_f, real_g, real_f, rg, rf, pinned, dense_t)
    lam_f = torch.where(row_pad, lam_pad_f, a * r_safe * mu_f)
    lam_g = torch.where(col_pad, lam_pad_g, b * c_safe * mu_g)
    return lam_f, lam_g


class _Transposed:
    def __init__(self, Q):
        self.Q = Q

    def mv(self, v):
        return self.Q.rmv(v)

    def rmv(self, u):
        return self.Q.mv(u)


def _solve(Q, a, b, diag_f, diag_g, real_f, real_g, rf, rg, pinned, dense):
    """``[[diag_f, P], [P^T, diag_g]] μ = (rf, rg)`` on the real entries (``N >= M``)."""
    if dense is not None and min(dense.shape[1], dense.shape[2]) <= DENSE_MAX:
        return _solve_scaled_dense(dense, diag_f, diag_g, real_f, real_g, rf, rg, pinned)

    def p_mv(v):  # P v = a * Q (b v)
        return a * Q.mv(b * v)

    def p_rmv(u):  # P^T u = b * Q^T (a u)
        return b * Q.rmv(a * u)

    rhs = rg - p_rmv(rf / diag_f)
    mu_g = _schur_cg_products(p_mv, p_rmv, diag_f, diag_g, real_g, rhs, pinned)
    mu_f = (rf - p_mv(mu_g)) / diag_f
    return mu_f * real_f, mu_g


def _system_parts(a, b, eps, inv_rho):
    """``tau_a, tau_b (B, 1)`` and ``pinned (B, 1)`` (1 for balanced problems)."""
    e = eps.unsqueeze(-1)
    tau_a = 1 / (1 + e * inv_rho[:, :1])
    tau_b = 1 / (1 + e * inv_rho[:, 1:])
    pinned = ((inv_rho == 0).all(-1, keepdim=True)).to(a.dtype)
    return tau_a, tau_b, pinned


def _relaxation_grads(eps, inv_rho, f, g, lam_f, lam_g, want_eps, want_rho):
    """The gradients of the ``eps f / rho`` terms of the residuals."""
    grad_eps = grad_inv = None
    if want_eps:
        grad_eps = -(lam_f * f).sum(-1) * inv_rho[:, 0] - (lam_g * g).sum(-1) * inv_rho[:, 1]
    if want_rho:
        grad_inv = -eps.unsqueeze(-1) * torch.stack(
            ((lam_f * f).sum(-1), (lam_g * g).sum(-1)), dim=-1
        )
        grad_inv = torch.where(inv_rho == 0, 0, grad_inv)  # hard sides have no rho
    return grad_eps, grad_inv


class ImplicitRelaxedPotentials(torch.autograd.Function):
    """Identity on converged ``(f, g)`` of a dense cost; backward: the damped adjoint.

    ``forward(C (B,N,M), a (B,N), b (B,M), eps (B,), inv_rho (B,2), f (B,N), g (B,M))``.
    """

    @staticmethod
    def forward(ctx, C, a, b, eps, inv_rho, f, g):
        ctx.save_for_backward(C, a, b, eps, inv_rho, f, g)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        C, a, b, eps, inv_rho, f, g = ctx.saved_tensors
        inputs = (C, a, b, eps, inv_rho)
        refused = first_order_only(ImplicitRelaxedPotentials.backward, ctx, grad_f, grad_g, inputs)
        if refused is not None:
            return refused
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        want_C, want_a, want_b, want_eps, want_rho = ctx.needs_input_grad[:5]
        Qd = fixed_point_kernel(C, a, b, eps, f, g)
        Q = Products(Qd)
        r, c, off = fixed_point_sums(Q, a, b, f, g, inv_rho)
        tau_a, tau_b, pinned = _system_parts(a, b, eps, inv_rho)
        keep = (~off).unsqueeze(-1)
        if bool(off.any()):  # a decoupled, well-posed system for the skipped problems
            Qd = torch.where(keep.unsqueeze(-1), Qd, 0)
            Q = Products(Qd)
            r, c = torch.where(keep, r, 1), torch.where(keep, c, 1)
        gf, gg = torch.where(keep, grad_f, 0), torch.where(keep, grad_g, 0)
        P = (Qd * a.unsqueeze(2)).mul_(b.unsqueeze(1))
        lam_f, lam_g = relaxed_adjoint(Q, a, b, r, c, tau_a, tau_b, pinned, gf, gg, dense=P)
        wanted = (want_C, want_a, want_b, want_eps)
        grads = list(parameter_grads(Qd, C, a, b, eps, f, g, lam_f, lam_g, wanted))
        extra_eps, grad_inv = _relaxation_grads(
            eps, inv_rho, f, g, lam_f, lam_g, want_eps, want_rho
        )
        if want_eps:
            grads[3] = grads[3] + extra_eps
        if bool(off.any()):
            rho = torch.where(inv_rho == 0, torch.inf, 1 / torch.where(inv_rho == 0, 1, inv_rho))
            fallback = last_half_step_grads(DenseCost(C), a, b, eps, f, grad_g, wanted, rho=rho)
            grads = [_merge_per_problem(off, g1, g2) for g1, g2 in zip(grads, fallback)]
            if grad_inv is not None:
                grad_inv = torch.where(off.unsqueeze(-1), 0, grad_inv)
        return (*grads, grad_inv, None, None)


class ImplicitRelaxedPointPotentials(torch.autograd.Function):
    """The matrix-free twin of :class:`ImplicitRelaxedPotentials` for point clouds.

    ``forward(geometry, a, b, eps, inv_rho (B, 2), f, g, x (B,N,D), y (B,M,D))``.
    """

    @staticmethod
    def forward(ctx, geometry, a, b, eps, inv_rho, f, g, x, y):
        ctx.geometry = geometry
        ctx.save_for_backward(a, b, eps, inv_rho, f, g, x, y)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        from .autograd_lazy import BlockQ, point_parameter_grads

        a, b, eps, inv_rho, f, g, x, y = ctx.saved_tensors
        inputs = (a, b, eps, inv_rho, x, y)
        refused = first_order_only(
            ImplicitRelaxedPointPotentials.backward, ctx, grad_f, grad_g, inputs
        )
        if refused is not None:
            return refused
        want_a, want_b, want_eps, want_rho = ctx.needs_input_grad[1:5]
        want_x, want_y = ctx.needs_input_grad[7:9]
        geometry = ctx.geometry.with_points(x.detach(), y.detach())
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        Q = BlockQ(geometry, f, g, eps, a, b)
        r, c, off = fixed_point_sums(Q, a, b, f, g, inv_rho)
        tau_a, tau_b, pinned = _system_parts(a, b, eps, inv_rho)
        keep = (~off).unsqueeze(-1)
        if bool(off.any()):
            Q = BlockQ(geometry, f, g, eps, a, b, keep=~off)
            r, c = torch.where(keep, r, 1), torch.where(keep, c, 1)
        gf, gg = torch.where(keep, grad_f, 0), torch.where(keep, grad_g, 0)
        lam_f, lam_g = relaxed_adjoint(Q, a, b, r, c, tau_a, tau_b, pinned, gf, gg)
        wanted = (want_x, want_y, want_a, want_b, want_eps)
        grads = list(
            point_parameter_grads(geometry, Q, a, b, eps, f, g, r, c, lam_f, lam_g, wanted)
        )
        extra_eps, grad_inv = _relaxation_grads(
            eps, inv_rho, f, g, lam_f, lam_g, want_eps, want_rho
        )
        if want_eps:
            grads[4] = grads[4] + extra_eps
        if bool(off.any()):
            rho = torch.where(inv_rho == 0, torch.inf, 1 / torch.where(inv_rho == 0, 1, inv_rho))
            fallback = last_half_step_grads(
                geometry, a, b, eps, f, grad_g, wanted, tensors=(x, y), rho=rho
            )
            grads = [_merge_per_problem(off, g1, g2) for g1, g2 in zip(grads, fallback)]
            if grad_inv is not None:
                grad_inv = torch.where(off.unsqueeze(-1), 0, grad_inv)
        grad_x, grad_y, grad_a, grad_b, grad_eps = grads
        return None, grad_a, grad_b, grad_eps, grad_inv, None, None, grad_x, grad_y


def relaxed_envelope(
    geometry, a, b, eps, f, g, plan, value, value_linear, rho, cost_term, row_total=None
):
    """``value`` with Danskin's gradients for a batch with relaxed marginals.

    Balanced problems of the batch get the terms of
    :func:`sinkhorn_ot.autograd.envelope_value`; relaxed ones those of the module
    docstring. ``f, g, plan, value, value_linear`` are detached; ``cost_term`` carries
    ``dV/dC = P``. ``row_total`` sums a sum over rows over ranks where ``a, f, plan``
    are one rank's rows (``None``: all rows here; ``value``, ``value_linear`` are totals).
    """
    from .plan import LazyPlan

    total = (lambda t: t) if row_total is None else row_total
    with torch.no_grad():
        if isinstance(plan, LazyPlan):
            rows, cols = plan.marginals()
        else:
            rows, cols = plan.sum(2), plan.sum(1)
        cols = total(cols)
        e = eps.detach().unsqueeze(-1)
        mass_a = total(a.detach().sum(-1, keepdim=True))
        mass_b = b.detach().sum(-1, keepdim=True)
        relaxed = ub.relaxed_problems(rho, a.shape[0], a.device).unsqueeze(-1)
        hard = torch.isinf(rho.detach())
        safe = torch.where(hard, 1, rho.detach())
        # phi(p) and KL(marginal | weights) per side; f on a hard side.
        phi_f = torch.where(hard[:, :1], f, -safe[:, :1] * torch.expm1(-f / safe[:, :1]))
        phi_g = torch.where(hard[:, 1:], g, -safe[:, 1:] * torch.expm1(-g / safe[:, 1:]))
        a_pos, b_pos = a.detach() > 0, b.detach() > 0
        a_safe = torch.where(a_pos, a.detach(), 1)
        b_safe = torch.where(b_pos, b.detach(), 1)
        da = phi_f - e * (rows / a_safe - mass_b)
        db = phi_g - e * (cols / b_safe - mass_a)
        da = torch.where(relaxed, torch.where(a_pos, da, 0), f - e / 2)
        db = torch.where(relaxed, torch.where(b_pos, db, 0), g - e / 2)
        plan_mass = total(rows.sum(-1))
        transport = total((rows * f).sum(-1)) + (cols * g).sum(-1) - value_linear
        kl_relaxed = transport / e.squeeze(-1) - plan_mass + (mass_a * mass_b).squeeze(-1)
        kl = torch.where(relaxed.squeeze(-1), kl_relaxed, (value - value_linear) / eps.detach())
        kl_rows = total(_kl(rows, a.detach(), a_pos))
        kl_sides = torch.stack((kl_rows, _kl(cols, b.detach(), b_pos)), dim=-1)
        kl_sides = torch.where(hard, 0, kl_sides)
    rho_safe = torch.where(hard, 1, rho)
    return (
        value
        + (da * (a - a.detach())).sum(-1)
        + (db * (b - b.detach())).sum(-1)
        + cost_term
        + kl * (eps - eps.detach())
        + (kl_sides * (rho_safe - rho_safe.detach())).sum(-1)
    )


def _kl(p, q, positive):
    """Generalised ``KL(p | q) = sum p log(p / q) - p + q`` over the entries ``q > 0``."""
    ratio = torch.where(positive & (p > 0), p / torch.where(positive, q, 1), 1)
    return torch.where(positive, p * ratio.log() - p + q, 0).sum(-1)
