"""Gradients at the fixed point: implicit differentiation and the envelope theorem.

Implicit (docs/conventions.md, "Gradients"). The potentials solve ``F(x, θ) = 0`` with ``x = (f, g)``,
``θ = (C, a, b, eps)`` and

    F_f = f - row(g),    F_g = g - col(f)

(the Sinkhorn maps of :mod:`sinkhorn_ot._updates`). Its Jacobian is
``J = [[I, Q diag(b)], [Q^T diag(a), I]]`` with ``Q_ij = exp((f_i + g_j - C_ij) / eps)``,
which equals ``D^{-1} H`` for ``D = diag(a, b)`` and the symmetric positive
semi-definite ``H = [[diag(a), P], [P^T, diag(b)]]``. Backpropagating ``x̄`` means
solving ``J^T λ = x̄``, i.e. ``H μ = x̄`` and ``λ = D μ``, then
``θ̄ = -∂/∂θ <λ, F(x, θ)>`` (in closed form, :func:`parameter_grads`). Memory is a few
``(B, N, M)`` tensors whatever the number of iterations.

``H`` has the null space ``(1, -1)`` (``(f + c, g - c)`` solves the same problem). The
outputs the user sees are normalised potentials and the plan, all invariant to that
shift, so ``x̄`` is orthogonal to it and ``H μ = x̄`` is consistent; we project out
rounding and pin the solution with a rank-one term (dense) or by staying in the range
(conjugate gradients).

Padding: a row with ``a_i = 0`` has ``J``'s identity row, so ``λ_i = x̄_i``; its
influence on the other equations is moved to the right-hand side, and the remaining
system only couples real rows and columns.

The dense path eliminates the larger side (Schur complement
``S = diag(b) - P^T diag(a)^{-1} P`` on the smaller side) and solves it in float64;
above :data:`DENSE_MAX` it runs preconditioned conjugate gradients on ``S`` using only
products with ``P`` and ``P^T``.
"""

from __future__ import annotations

import torch

from ._updates import safe_log
from .errors import ImplicitGradientError
from .geometry import DenseCost

#: Largest min(N, M) solved by a dense batched factorisation; larger uses CG.
DENSE_MAX = 512
#: Relative residual at which conjugate gradients stop, by dtype.
CG_RTOL = {torch.float64: 1e-11, torch.float32: 1e-6}
CG_MAX_ITER = 2000

_NON_FINITE_ADJOINT = (
    "grad='implicit' met a non-finite plan in its adjoint system, which happens when the "
    "forward solve did not converge at a small eps (the plan of unconverged potentials "
    "overflows). Raise max_iter, raise eps, use eps_scaling, or use grad='envelope'"
)


_SECOND_ORDER = (
    "second derivatives through sinkhorn(grad='implicit') are not supported; "
    "use grad='unroll' for higher-order gradients"
)


class ImplicitPotentials(torch.autograd.Function):
    """Identity on converged ``(f, g)`` whose backward is the implicit-function adjoint.

    ``forward(C (B,N,M), a (B,N), b (B,M), eps (B,), f (B,N), g (B,M)) -> (f, g)``.
    """

    @staticmethod
    def forward(ctx, C, a, b, eps, f, g):
        ctx.save_for_backward(C, a, b, eps, f, g)
        return f.clone(), g.clone()

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        C, a, b, eps, f, g = ctx.saved_tensors
        refused = first_order_only(ImplicitPotentials.backward, ctx, grad_f, grad_g, (C, a, b, eps))
        if refused is not None:
            return refused
        grad_f = torch.zeros_like(f) if grad_f is None else grad_f
        grad_g = torch.zeros_like(g) if grad_g is None else grad_g
        Q = fixed_point_kernel(C, a, b, eps, f, g)
        wanted = ctx.needs_input_grad[:4]
        off = far_from_fixed_point(Q, a, b)  # (B,) bool
        if bool(off.all()):
            grads = last_half_step_grads(DenseCost(C), a, b, eps, f, grad_g, wanted)
            return (*grads, None, None)
        lam_f, lam_g = adjoint(Q, a, b, grad_f, grad_g, skip=off)
        grads = parameter_grads(Q, C, a, b, eps, f, g, lam_f, lam_g, wanted)
        if bool(off.any()):
            fallback = last_half_step_grads(DenseCost(C), a, b, eps, f, grad_g, wanted)
            grads = tuple(_merge_per_problem(off, g1, g2) for g1, g2 in zip(grads, fallback))
        return (*grads, None, None)


def fixed_point_kernel(C, a, b, eps, f, g):
    """``Q = exp((f_i + g_j - C_ij) / eps)`` ``(B, N, M)``, 0 where row and column are padding.

    Pairs of two padded entries carry no mass and enter no equation of the adjoint, but
    their exponent can overflow at small eps, and ``inf * 0`` would turn every gradient
    into NaN.
    """
    logits = (f.unsqueeze(2) + g.unsqueeze(1) - C) / eps.view(-1, 1, 1)
    both_padded = (a == 0).unsqueeze(2) & (b == 0).unsqueeze(1)
    if not bool(both_padded.any()):
        return torch.exp(logits)
    return torch.where(both_padded, 0, torch.exp(torch.where(both_padded, 0, logits)))


#: Relative L1 marginal violation of ``(f, g)`` beyond which the implicit function
#: theorem's adjoint is not used (see :func:`far_from_fixed_point`).
FIXED_POINT_SLACK = 1e-2


def far_from_fixed_point(Q, a, b) -> torch.Tensor:
    """``(B,)`` bool: problems whose ``(f, g)`` is far from a fixed point.

    The implicit adjoint linearises the Sinkhorn maps at a fixed point, where the row
    and column sums ``r = Q b``, ``c = Q^T a`` are 1. A solve that stopped far from it
    (``max_iter`` too small, an annealing cut short) can have ``r`` of 1e30 on rows of
    tiny weight, and its adjoint overflows. Such problems are flagged when their
    violation exceeds :data:`FIXED_POINT_SLACK` or any sum is not finite.
    """
    r = torch.bmm(Q, b.unsqueeze(-1)).squeeze(-1)  # (B, N)
    c = torch.bmm(a.unsqueeze(1), Q).squeeze(1)  # (B, M)
    return _off_fixed_point(r, c, a, b)


def _off_fixed_point(r, c, a, b) -> torch.Tensor:
    gap = (a * (r - 1).abs()).sum(-1) + (b * (c - 1).abs()).sum(-1)
    finite = torch.isfinite(r).all(-1) & torch.isfinite(c).all(-1)
    return ~finite | ~(gap <= FIXED_POINT_SLACK * a.sum(-1))


def last_half_step_grads(geometry, a, b, eps, f, grad_g, wanted, tensors=None, rho=None):
    """Gradients of the returned solution where the implicit adjoint does not apply.

    The returned ``g`` is exactly ``col(f)``; these are the gradients of that last
    half-step with ``f`` held fixed (always finite: the derivatives of a log-sum-exp are
    softmax weights). ``grad_f`` does not propagate. Returns gradients for
    ``(C or the points, a, b, eps)`` in the order of ``wanted`` (the geometry's tensors
    first: ``C`` for a dense cost, ``x, y`` for a point cloud with ``tensors``); ``rho
    (B, 2)`` damps the half-step of unbalanced problems (held fixed).
    """
    from ._unbalanced import damping
    from ._updates import safe_log

    inputs = list(tensors) if tensors is not None else [geometry.C]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (*inputs, a, b, eps)]
        *geo, a_l, b_l, eps_l = leaves
        if tensors is None:
            geom = type(geometry)(geo[0])
        else:
            geom = geometry.with_points(*geo)
        e = eps_l.unsqueeze(-1)
        tau = damping(None if rho is None else rho.detach(), e.detach())
        step = geom.log_step(safe_log(a_l), safe_log(b_l), e, tau)
        g_new = step.col(f.detach())
        chosen = [t for t, w in zip(leaves, wanted) if w]
        grads = torch.autograd.grad(g_new, chosen, grad_g, allow_unused=True) if chosen else ()
    out, it = [], iter(grads)
    for t, w in zip(leaves, wanted):
        if not w:
            out.append(None)
            continue
        grad = next(it)
        out.append(torch.zeros_like(t) if grad is None else grad)
    return tuple(out)


def _merge_per_problem(off, regular, fallback):
    """Per problem of the batch (dim 0): ``fallback`` where ``off``, else ``regular``."""
    if regular is None:
        return None
    mask = off.view(-1, *([1] * (regular.dim() - 1)))
    return torch.where(mask, fallback, torch.nan_to_num(regular))


def first_order_only(backward, ctx, grad_f, grad_g, inputs):
    """Under ``create_graph=True``: the gradients of ``backward``, refusing a second one.

    Returns ``None`` when no graph is being built (the caller computes the gradients as
    usual), else ``backward``'s gradients computed without a graph and wrapped so that
    differentiating them raises the clear :data:`_SECOND_ORDER` error.
    """
    anchor = next((t for t in inputs if t.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return None
    with torch.no_grad():
        grads = backward(ctx, grad_f, grad_g)
    return tuple(None if t is None else _NoSecondOrder.apply(t, anchor) for t in grads)


class _NoSecondOrder(torch.autograd.Function):
    """Identity on a gradient; differentiating it again raises a clear error."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_SECOND_ORDER)


def residuals(C, a, b, eps, f, g):
    """``F_f = f - row(g)`` ``(B, N)`` and ``F_g = g - col(f)`` ``(B, M)``, log domain.

    The backward uses their derivatives in closed form (:func:`parameter_grads`); this
    differentiable version is what the tests check them against.
    """
    e = eps.view(-1, 1, 1)
    base = (f.unsqueeze(2) + g.unsqueeze(1) - C) / e  # (B, N, M)
    # f - row(g) = eps * log sum_j b_j exp((f_i + g_j - C_ij) / eps), likewise for g.
    F_f = eps.unsqueeze(-1) * torch.logsumexp(safe_log(b).unsqueeze(1) + base, dim=2)
    F_g = eps.unsqueeze(-1) * torch.logsumexp(safe_log(a).unsqueeze(2) + base, dim=1)
    return F_f, F_g


def parameter_grads(Q, C, a, b, eps, f, g, lam_f, lam_g, wanted):
    """``θ̄ = -∂/∂θ (<λ_f, F_f> + <λ_g, F_g>)`` for ``θ = (C, a, b, eps)``, in closed form.

    With ``r_i = Σ_j b_j Q_ij`` and ``c_j = Σ_i a_i Q_ij`` (both about 1 at the fixed
    point) the residuals are ``F_f = eps log r`` and ``F_g = eps log c``, so, with
    ``L = f + g - C``::

        C̄_ij = Q_ij (λf_i b_j / r_i + a_i λg_j / c_j)
        ā_i  = -eps Σ_j Q_ij λg_j / c_j          (0 where a_i = 0, as log's gradient there)
        b̄_j  = -eps Σ_i λf_i Q_ij / r_i          (0 where b_j = 0)
        eps̄  = -Σ_i λf_i (log r_i - Σ_j b_j Q_ij L_ij / (r_i eps))
               -Σ_j λg_j (log c_j - Σ_i a_i Q_ij L_ij / (c_j eps))

    This reuses the adjoint's ``Q`` instead of differentiating :func:`residuals` with
    autograd, which costs several more ``(B, N, M)`` passes and exponentials.

    Args:
        Q: ``exp((f_i + g_j - C_ij) / eps)``, ``(B, N, M)``.
        C: ``(B, N, M)``; a, f, lam_f: ``(B, N)``; b, g, lam_g: ``(B, M)``; eps: ``(B,)``.
        wanted: four bools, which of ``C, a, b, eps`` need a gradient.

    Returns:
        ``(C̄, ā, b̄, eps̄)`` with ``None`` for those not wanted.
    """
    want_C, want_a, want_b, want_eps = wanted
    r = torch.bmm(Q, b.unsqueeze(-1)).squeeze(-1)  # (B, N)
    c = torch.bmm(a.unsqueeze(1), Q).squeeze(1)  # (B, M)
    u, v = lam_f / r, lam_g / c
    e = eps.unsqueeze(-1)
    grad_C = grad_a = grad_b = grad_eps = None
    if want_C:
        # u_i b_j + a_i v_j as one (N, 2) x (2, M) product: one pass instead of three.
        grad_C = torch.bmm(torch.stack((u, a), -1), torch.stack((b, v), 1)).mul_(Q)
    if want_a:
        grad_a = torch.where(a > 0, -e * torch.bmm(Q, v.unsqueeze(-1)).squeeze(-1), 0)
    if want_b:
        grad_b = torch.where(b > 0, -e * torch.bmm(u.unsqueeze(1), Q).squeeze(1), 0)
    if want_eps:
        QL = Q * (f.unsqueeze(2) + g.unsqueeze(1) - C)  # (B, N, M)
        row_mean = torch.bmm(QL, b.unsqueeze(-1)).squeeze(-1) / r
        col_mean = torch.bmm(a.unsqueeze(1), QL).squeeze(1) / c
        grad_eps = -(lam_f * (r.log() - row_mean / e)).sum(-1)
        grad_eps = grad_eps - (lam_g * (c.log() - col_mean / e)).sum(-1)
    return grad_C, grad_a, grad_b, grad_eps


def adjoint(Q, a, b, grad_f, grad_g, skip=None):
    """Solve ``J^T λ = (grad_f, grad_g)`` at the fixed point; returns ``λ_f, λ_g``.

    Args:
        Q: ``exp((f_i + g_j - C_ij) / eps)``, ``(B, N, M)``.
        a, grad_f: ``(B, N)``; b, grad_g: ``(B, M)``.
        skip: ``(B,)`` bool, problems whose system is replaced by the identity (their
            λ is not used; see :func:`far_from_fixed_point`), or ``None``.
    """
    if skip is not None and bool(skip.any()):
        keep = ~skip.view(-1, 1, 1)
        Q = torch.where(keep, Q, 0)  # a decoupled, well-posed system for skipped problems
        grad_f = torch.where(keep[:, :, 0], grad_f, 0)
        grad_g = torch.where(keep[:, :, 0], grad_g, 0)
    row_pad, col_pad = a == 0, b == 0
    # Padded rows/columns have identity rows in J^T: λ = x̄ there; move their
    # coupling to the right-hand side of the real equations.
    rf = grad_f - a * torch.bmm(Q, torch.where(col_pad, grad_g, 0).unsqueeze(-1)).squeeze(-1)
    rg = grad_g - b * torch.bmm(torch.where(row_pad, grad_f, 0).unsqueeze(1), Q).squeeze(1)
    rf = torch.where(row_pad, 0, rf)
    rg = torch.where(col_pad, 0, rg)
    P = (Q * a.unsqueeze(2)).mul_(b.unsqueeze(1))
    if a.shape[1] >= b.shape[1]:
        mu_f, mu_g = _solve_h(P, a, b, rf, rg)
    else:
        mu_g, mu_f = _solve_h(P.transpose(1, 2), b, a, rg, rf)
    lam_f = torch.where(row_pad, grad_f, a * mu_f)
    lam_g = torch.where(col_pad, grad_g, b * mu_g)
    return lam_f, lam_g


def _solve_h(P, a, b, rf, rg):
    """Solve ``[[diag(a), P], [P^T, diag(b)]] (μf, μg) = (rf, rg)`` on the real entries.

    Up to :data:`DENSE_MAX` (``min(N, M)``) a dense solve of the scaled system
    (:func:`_solve_scaled_dense`); above, CG on the Schur complement of the ``(M, M)``
    side (the caller makes ``N >= M``). Zero weights are padding: their μ is 0.
    """
    real_f, real_g, a_safe, b_safe, rf, rg = consistent_system(a, b, rf, rg)
    if min(P.shape[1], P.shape[2]) <= DENSE_MAX:
        return _solve_scaled_dense(P, a_safe, b_safe, real_f, real_g, rf, rg)
    rhs = rg - torch.bmm(P.transpose(1, 2), (rf / a_safe).unsqueeze(-1)).squeeze(-1)  # (B, M)
    mu_g = _schur_cg(P, a_safe, b_safe, real_g, rhs)
    mu_f = (rf - torch.bmm(P, mu_g.unsqueeze(-1)).squeeze(-1)) / a_safe
    return mu_f * real_f, mu_g


def consistent_system(a, b, rf, rg, pinned=None):
    """Masks and safe weights of ``H μ = (rf, rg)``, and the right-hand side made consistent.

    Returns ``real_f, real_g`` (1 on real entries), ``a_safe, b_safe`` (1 on padding) and
    ``rf, rg`` with the rounding along ``H``'s null vector ``(1, -1)`` removed (the system
    is consistent only orthogonally to it). ``pinned (B, 1)`` (1: balanced, 0: a relaxed
    problem, whose ``H`` has no null space) limits that to the balanced problems.
    """
    real_f, real_g = (a > 0).to(rf.dtype), (b > 0).to(rf.dtype)
    a_safe = torch.where(a > 0, a, 1)
    b_safe = torch.where(b > 0, b, 1)
    count = real_f.sum(-1, keepdim=True) + real_g.sum(-1, keepdim=True)
    drift = ((rf * real_f).sum(-1, keepdim=True) - (rg * real_g).sum(-1, keepdim=True)) / count
    if pinned is not None:
        drift = drift * pinned
    return real_f, real_g, a_safe, b_safe, rf - drift * real_f, rg + drift * real_g


def _solve_scaled_dense(P, a_safe, b_safe, real_f, real_g, rf, rg, pinned=None):
    """The dense solve in the variables ``ν = (sqrt(a) μf, sqrt(b) μg)``, in float64.

    Scaling ``H`` by ``diag(a, b)^(-1/2)`` on both sides gives ``[[I, A], [A^T, I]]`` with
    ``A_ij = P_ij / sqrt(a_i b_j)``, whose singular values lie in [0, 1]: the Schur
    complement ``I - A^T A`` is as well conditioned as Sinkhorn's mixing allows, whatever
    the weights. (Dividing by ``a`` directly made rows of tiny weights, 1e-30 say, round
    to copies of each other once the null space was pinned: an exactly singular matrix.)
    Its null vector is ``sqrt(b)`` on the real columns, pinned by the rank-one term
    ``u u^T`` (``u`` its unit vector); the right-hand side is projected orthogonally to it.
    Non-finite entries (an unconverged problem whose plan overflowed) are never factorised:
    :class:`ImplicitGradientError` says what to change. ``pinned (B, 1)``: 0 for relaxed
    problems (``sinkhorn_ot.autograd_unbalanced``), whose system has no null space: the
    diagonal ``a_safe, b_safe`` is then the plan's marginals over the damping, and
    neither the pin nor the projection applies.
    """
    dtype = P.dtype
    P64 = P.double()
    sa, sb = a_safe.double().sqrt(), b_safe.double().sqrt()
    real_f64, real_g64 = real_f.double(), real_g.double()
    A = P64 / sa.unsqueeze(2) / sb.unsqueeze(1)  # (B, N, M); zero on padding (P is)
    rt_f = rf.double() / sa * real_f64
    rt_g = rg.double() / sb * real_g64
    eye = torch.diag_embed(torch.ones_like(sb))
    S = eye - torch.bmm(A.transpose(1, 2), A)
    u = sb * real_g64
    u = u / u.norm(dim=-1, keepdim=True)
    if pinned is not None:
        u = u * pinned.double()
    S = S + u.unsqueeze(2) * u.unsqueeze(1)
    rhs = rt_g - torch.bmm(A.transpose(1, 2), rt_f.unsqueeze(-1)).squeeze(-1)
    rhs = (rhs - u * (u * rhs).sum(-1, keepdim=True)) * real_g64
    if not bool(torch.isfinite(S).all() & torch.isfinite(rhs).all()):
        raise ImplicitGradientError(_NON_FINITE_ADJOINT)
    nu_g = _solve_positive_definite(S, rhs)
    nu_f = rt_f - torch.bmm(A, nu_g.unsqueeze(-1)).squeeze(-1)
    mu_f = (nu_f / sa * real_f64).to(dtype)
    mu_g = (nu_g / sb * real_g64).to(dtype)
    return mu_f, mu_g


def _solve_positive_definite(S: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``S^-1 rhs`` for symmetric positive definite ``S (B, K, K)``, ``rhs (B, K)``.

    Cholesky, not LU: MKL's batched LU (``torch.linalg.solve``) fails outright ("Pivots
    given to lu_solve must all be greater or equal to 1") once ``torch.set_num_threads``
    has been called (torch 2.14), and Cholesky needs half the work. A problem whose
    matrix is not numerically positive definite (an ill-conditioned Schur complement)
    is solved by least squares instead.
    """
    factor, info = torch.linalg.cholesky_ex(S)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    rejected = info != 0
    if bool(rejected.any()):
        fallback = torch.linalg.lstsq(S[rejected], rhs[rejected].unsqueeze(-1)).solution
        solution[rejected] = fallback.squeeze(-1)
    return solution


def _schur_cg(P, a_safe, b_safe, real_g, rhs):
    """Jacobi-preconditioned CG on ``S x = rhs`` with ``S x = b x - P^T (P x / a)``."""

    def p_mv(x):  # (B, M) -> (B, N)
        return torch.bmm(P, x.unsqueeze(-1)).squeeze(-1)

    def p_rmv(y):  # (B, N) -> (B, M)
        return torch.bmm(P.transpose(1, 2), y.unsqueeze(-1)).squeeze(-1)

    return _schur_cg_products(p_mv, p_rmv, a_safe, b_safe, real_g, rhs)


def _schur_cg_products(p_mv, p_rmv, a_safe, b_safe, real_g, rhs, pinned=None):
    """CG on the Schur complement given only the products ``P x`` and ``P^T y``.

    ``pinned (B, 1)``: 0 for relaxed problems, whose complement has no null vector to
    project out (see :func:`_solve_scaled_dense`).
    """
    m = real_g.sum(-1, keepdim=True)
    dtype = rhs.dtype
    along = real_g if pinned is None else real_g * pinned

    def project(v):  # stay orthogonal to S's null vector
        return (v - along * ((v * real_g).sum(-1, keepdim=True) / m)) * real_g

    def matvec(x):
        return b_safe * x - p_rmv(p_mv(x) / a_safe)

    r = project(rhs)
    x = torch.zeros_like(r)
    z = project(r / b_safe)
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    target = CG_RTOL.get(dtype, 1e-6) * r.norm(dim=-1, keepdim=True)
    # Each problem stops on its own: at its tolerance, or at a breakdown (curvature or
    # r.z not positive). A problem kept iterating once its residual is rounding noise
    # (a right-hand side that cancels to 1e-17, as for the value of a self-transport
    # problem) meets non-positive curvature, and a clamped step then overflows to NaN.
    active = r.norm(dim=-1, keepdim=True) > target
    for _ in range(CG_MAX_ITER):
        if not bool(active.any()):
            break
        Sp = project(matvec(p))
        curvature = (p * Sp).sum(-1, keepdim=True)
        step = active & (curvature > 0) & (rz > 0)
        alpha = torch.where(step, rz / torch.where(step, curvature, 1), 0)
        x = x + alpha * p
        r = r - alpha * Sp
        z = project(r / b_safe)
        rz_next = (r * z).sum(-1, keepdim=True)
        beta = torch.where(step, rz_next / torch.where(step, rz, 1), 0)
        p = torch.where(step, z + beta * p, p)
        rz = torch.where(step, rz_next, rz)
        active = step & (r.norm(dim=-1, keepdim=True) > target)
    return x


def implicit_potentials(geometry, a, b, eps, f, g, rho=None):
    """``(f, g)`` with implicit-function gradients, for any geometry.

    A dense cost uses the dense adjoint (:class:`ImplicitPotentials`); a point cloud
    the matrix-free one (:class:`sinkhorn_ot.autograd_lazy.ImplicitPointPotentials`).
    A batch with relaxed marginals (``rho (B, 2)``) goes to
    :mod:`sinkhorn_ot.autograd_unbalanced`.
    """
    if rho is not None:
        from .autograd_unbalanced import implicit_relaxed_potentials

        return implicit_relaxed_potentials(geometry, a, b, eps, f, g, rho)

    if isinstance(geometry, DenseCost):
        return ImplicitPotentials.apply(geometry.C, a, b, eps, f, g)
    from .autograd_lazy import ImplicitPointPotentials

    return ImplicitPointPotentials.apply(geometry, a, b, eps, f, g, geometry.x, geometry.y)


def envelope_value(geometry, a, b, eps, f, g, plan, value, value_linear, rho=None, row_total=None):
    """``value`` with Danskin's gradients and no graph through the iterations.

    The regularised OT value ``V = min_P <C, P> + eps KL(P || a b^T)`` has
    ``dV/dC = P``, ``dV/deps = KL(P || a b^T) = (V - <C, P>) / eps`` and, for the
    normalised potentials, ``dV/da = f - eps / 2``, ``dV/db = g - eps / 2`` (the
    Lagrange multipliers of the marginal constraints; the split of the free constant
    ``(f + c, g - c)`` cancels for perturbations that keep the masses equal, and the
    ``-eps / 2`` makes joint mass changes exact). All of ``f, g, plan, value`` are
    detached; each term below is zero in value and carries one partial derivative.
    For a point cloud, ``dV/dC = P`` reaches the points through
    :class:`sinkhorn_ot.autograd_lazy.PlanCostPairing` (no dense plan). Relaxed
    problems (``rho (B, 2)``): :func:`sinkhorn_ot.autograd_unbalanced.relaxed_envelope`
    (``row_total``: its sum over ranks where the rows are sharded).
    """

    if isinstance(geometry, DenseCost):
        C = geometry.C
        cost_term = (plan * (C - C.detach())).sum((1, 2))
    else:
        from .autograd_lazy import PlanCostPairing

        cost_term = PlanCostPairing.apply(plan, geometry.x, geometry.y)
    e = eps.detach().unsqueeze(-1)
    kl = (value - value_linear) / eps.detach()
    if rho is not None:
        from .autograd_unbalanced import relaxed_envelope

        return relaxed_envelope(
            geometry, a, b, eps, f, g, plan, value, value_linear, rho, cost_term, row_total
        )
    return (
        value
        + ((f - e / 2) * (a - a.detach())).sum(-1)
        + ((g - e / 2) * (b - b.detach())).sum(-1)
        + cost_term
        + kl * (eps - eps.detach())
    )
