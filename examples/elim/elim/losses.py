"""Training losses of ELIM.

- :func:`regression_loss`, the main-step loss of appendix §3,
  ``MSE_v + MSE_a + 0.5 * (L_PCC + L_CCC)``.
- :func:`elim_loss`, the matching-step loss ``0.5 * ramp * sum_e MSE(f_theta(z_hat_e), y_e)``.
- :func:`warmup_ramp`, the weight of the ELIM loss over training iterations.

Correlations use population moments (divide by N) throughout, like
:mod:`elim.metrics`, and are differentiable with finite gradients even for constant
predictions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ccc", "elim_loss", "pcc", "regression_loss", "warmup_ramp"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.dim() == 0 or pred.shape[0] < 1:
        raise ValueError(
            f"`pred` must have at least one sample along dim 0, got {tuple(pred.shape)}"
        )


def pcc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along dim 0, ``cov / (sqrt(var_p + eps) sqrt(var_t + eps))``.

    Args:
        pred: ``(N,)`` or ``(N, K)``.
        target: same shape as ``pred``.
        eps: keeps the value and its gradient finite for constant inputs.

    Returns:
        ``()`` or ``(K,)`` correlations.

    Example:
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> round(pcc(x, 2 * x).item(), 4)
        1.0
    """
    _check_pair(pred, target)
    dp = pred - pred.mean(0)
    dt = target - target.mean(0)
    cov = (dp * dt).mean(0)
    return cov / (torch.sqrt(dp.pow(2).mean(0) + eps) * torch.sqrt(dt.pow(2).mean(0) + eps))


def ccc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Concordance correlation along dim 0, ``2 cov / (var_p + var_t + (mean_p - mean_t)^2 + eps)``.

    This equals the appendix's ``2 std_p std_t PCC / (...)`` since ``std_p std_t PCC = cov``.

    Args:
        pred: ``(N,)`` or ``(N, K)``.
        target: same shape as ``pred``.
        eps: keeps the value finite when both inputs are the same constant.

    Returns:
        ``()`` or ``(K,)`` concordance coefficients.

    Example:
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> round(ccc(x, x).item(), 4), round(ccc(x, x + 1).item(), 4)
        (1.0, 0.5714)
    """
    _check_pair(pred, target)
    mp, mt = pred.mean(0), target.mean(0)
    dp, dt = pred - mp, target - mt
    cov = (dp * dt).mean(0)
    return 2 * cov / (dp.pow(2).mean(0) + dt.pow(2).mean(0) + (mp - mt).pow(2) + eps)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Main-step loss ``MSE_v + MSE_a + 0.5 * (L_PCC + L_CCC)`` (appendix §3).

    ``L_PCC = 1 - (PCC_v + PCC_a) / 2`` and ``L_CCC = 1 - (CCC_v + CCC_a) / 2``. The
    appendix writes ``L_total = L_main + L_va + 0.5 (L_PCC + L_CCC)`` with
    ``L_va = MSE_v + MSE_a`` and never defines ``L_main``; the released training code
    uses exactly ``(MSE_v + MSE_a) + 0.5 * (L_PCC + L_CCC)``, so the squared error is
    counted once here (``L_main`` and ``L_va`` are the same term).

    Args:
        pred: predicted valence/arousal ``(N, 2)``.
        target: ground truth ``(N, 2)``.
        eps: see :func:`pcc` and :func:`ccc`.

    Returns:
        Scalar loss.

    Example:
        >>> y = torch.tensor([[0.1, 0.2], [0.5, -0.3], [-0.4, 0.6]])
        >>> round(regression_loss(y, y).item(), 6)
        0.0
    """
    _check_pair(pred, target)
    if pred.dim() != 2 or pred.shape[1] != 2:
        raise ValueError(f"`pred` must have shape (N, 2), got {tuple(pred.shape)}")
    mse = (pred - target).pow(2).mean(0)  # (2,): MSE_v, MSE_a
    loss_pcc = 1 - pcc(pred, target, eps).mean()
    loss_ccc = 1 - ccc(pred, target, eps).mean()
    return mse.sum() + 0.5 * (loss_pcc + loss_ccc)


def warmup_ramp(step: int, start: int = 5, end: int = 50) -> float:
    """Weight of the ELIM loss at training iteration ``step``.

    0 before ``start``, ``step / end`` from ``start`` until ``end``, then 1 (the released
    scripts' ``warmup_coef1 = 5``, ``warmup_coef2 = 50``).

    Args:
        step: 0-based training iteration.
        start: first iteration with a non-zero weight.
        end: iteration from which the weight is 1.

    Returns:
        The weight in [0, 1].

    Example:
        >>> [warmup_ramp(s) for s in (0, 4, 5, 25, 50, 99)]
        [0.0, 0.0, 0.1, 0.5, 1.0, 1.0]
    """
    if not 0 <= start <= end or end < 1:
        raise ValueError(
            f"`start` and `end` must satisfy 0 <= start <= end, end >= 1, got {start}, {end}"
        )
    if step < start:
        return 0.0
    if step < end:
        return step / end
    return 1.0


def elim_loss(
    projector: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ramp: float = 1.0,
    weight: float = 0.5,
    per_domain: bool = True,
) -> torch.Tensor:
    """ELIM loss ``weight * ramp * sum_e MSE(f_theta(z_hat_e), y_e)``.

    Takes the padded output of :func:`elim.matching.elim_matching_step` (row 0 the
    reference identity, rows 1.. the normalised targets). Each domain's MSE is the mean
    over its real samples and both outputs.

    With ``per_domain=True`` (default, as the released code) the projector runs once
    per domain, so its BatchNorm normalises each identity with that identity's own batch
    statistics; a single-sample domain is duplicated first (as the released
    ``LENGTH_CHECK``) because BatchNorm cannot train on one sample, which leaves its MSE
    unchanged. ``per_domain=False`` runs the projector once on all real samples.

    Args:
        projector: ``f_theta``, mapping ``(N, D)`` to ``(N, 2)``.
        features: ``(E, L, D)`` matched features, padded.
        labels: ``(E, L, 2)``.
        mask: ``(E, L)`` bool, ``True`` for real samples.
        ramp: warm-up weight (:func:`warmup_ramp`).
        weight: the constant 0.5 of the reference.
        per_domain: one projector call per domain (see above) or one for all.

    Returns:
        Scalar loss.

    Example:
        >>> proj = torch.nn.Linear(4, 2)
        >>> z, y = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
        >>> mask = torch.ones(3, 5, dtype=torch.bool)
        >>> elim_loss(proj, z, y, mask, ramp=0.0).item()
        0.0
    """
    if features.dim() != 3:
        raise ValueError(f"`features` must have shape (E, L, D), got {tuple(features.shape)}")
    e, length = features.shape[:2]
    if tuple(labels.shape) != (e, length, 2):
        raise ValueError(f"`labels` must have shape ({e}, {length}, 2), got {tuple(labels.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (e, length):
        raise ValueError(
            f"`mask` must be a bool tensor of shape ({e}, {length}), "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("`mask` must mark at least one real sample in every domain")
    if per_domain:
        total = features.new_zeros(())
        for z_e, y_e, m_e in zip(features, labels, mask):
            z_e, y_e = z_e[m_e], y_e[m_e]
            if z_e.shape[0] == 1:
                z_e, y_e = z_e.repeat(2, 1), y_e.repeat(2, 1)
            total = total + F.mse_loss(projector(z_e), y_e)
    else:
        pred = projector(features[mask])
        sq = (pred - labels[mask]).pow(2).mean(-1)  # (N_valid,)
        domain = torch.arange(e, device=mask.device).unsqueeze(1).expand(e, length)[mask]
        per = torch.zeros(e, dtype=sq.dtype, device=sq.device).index_add(0, domain, sq)
        total = (per / counts.to(sq.dtype)).sum()
    return weight * ramp * total
