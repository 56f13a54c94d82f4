"""The default stopping tolerance of :func:`sinkhorn_ot.sinkhorn`, ``tol="auto"``.

A plan is computed from ``(f_i + g_j - C_ij) / eps``: every term carries a rounding
error of about ``u |C|`` (``u`` the dtype's unit roundoff), which the division by
``eps`` turns into a relative error of the plan's entries, and so of its marginals.
No iteration, however many, brings the marginal violation below that floor. In float64
it is far below ``1e-5`` for any practical eps; in float32 at small eps it is not
(about ``2e-4`` for point clouds at GeomLoss's default blur 0.05, where ``max |C| /
eps`` is ``16 000``), so a fixed default of ``1e-5`` would make the default call warn
and spend its whole budget.

``"auto"`` therefore means ``max(1e-5, machine_eps * max|C| / eps)``
(:func:`resolve`): ``machine_eps = torch.finfo(dtype).eps = 2u`` times the largest
``max_ij |C_ij| / eps`` of the batch (real entries only, padding excluded, in the
frame the solver works in, after any centring of the cost). Measured floors are 0.07 to
0.65 of that bound over dense and point-cloud costs in float32 (docs/conventions.md,
"The default tolerance"): the bound is reached, if up to 14 times above the best the
dtype allows on point clouds (whose ``max |C|`` is far above the costs the plan uses).
The float64 Newton polish still aims at ``1e-5`` (:func:`aim`), so polished problems
come back near their floor.
"""

from __future__ import annotations

import torch

#: What ``tol="auto"`` asks for where rounding allows it (always, in float64).
DEFAULT_TOL = 1e-5


def is_auto(tol) -> bool:
    return isinstance(tol, str) and tol == "auto"


def real_cost_scale(geometry, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``max |C_ij|`` over the entries with ``a_i > 0`` and ``b_j > 0``.

    Args:
        geometry: the (unsharded) cost, ``(B, N, M)``, in the frame the solver uses.
        a, b: ``(B, N)``, ``(B, M)`` weights; zeros mark padding, whose cost (often a
            large filler value) must not loosen the tolerance.
    """
    real_cols = (b > 0).unsqueeze(1)  # (B, 1, M)
    top = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    with torch.no_grad():
        for i0, i1 in geometry.blocks():
            block = geometry.cost_block(i0, i1).detach().abs()
            real = (a[:, i0:i1] > 0).unsqueeze(2) & real_cols
            top = torch.maximum(top, torch.where(real, block, 0).amax(dim=(1, 2)))
    return top


def resolve(tol, dtype: torch.dtype, scale: torch.Tensor, eps: torch.Tensor) -> float | None:
    """The float ``tol`` a call stops on: ``tol`` itself, or for ``"auto"`` the larger
    of :data:`DEFAULT_TOL` and the rounding floor (one host sync).

    Args:
        tol: the validated ``tol``: a float, ``None`` or ``"auto"``.
        dtype: the compute dtype.
        scale: ``(B,)`` cost scale (:func:`real_cost_scale`).
        eps: ``(B,)`` target eps.

    Example:
        >>> import torch
        >>> from sinkhorn_ot._tolerance import resolve
        >>> scale, eps = torch.tensor([40.0]), torch.tensor([0.25])
        >>> resolve("auto", torch.float32, scale, eps) == torch.finfo(torch.float32).eps * 160
        True
        >>> resolve("auto", torch.float64, scale.double(), eps.double()), resolve(1e-3, torch.float32, scale, eps)
        (1e-05, 0.001)
    """
    if not is_auto(tol):
        return tol
    ratio = (scale.detach().double() / eps.detach().double()).max().item()
    return max(DEFAULT_TOL, torch.finfo(dtype).eps * ratio)


def aim(tol, resolved: float | None) -> float | None:
    """What the float64 Newton polish aims for: ``"auto"`` asks for :data:`DEFAULT_TOL`
    (the polish computes in float64, where it is reachable; the returned plan then sits
    at its dtype's floor, within ``resolved``), an explicit ``tol`` for itself."""
    return DEFAULT_TOL if is_auto(tol) else resolved
