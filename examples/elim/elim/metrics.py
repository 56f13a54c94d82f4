"""Evaluation metrics of appendix §3: RMSE, SAGR, PCC and CCC.

Every metric is computed once over the whole evaluation set (concatenate the
predictions of all batches first), in NumPy float64, with population moments
(``ddof=0``) everywhere. The released code averaged per-batch RMSEs and mixed ``ddof=1``
covariances with ``ddof=0`` standard deviations; numbers from the two differ slightly.

Conventions:

- SAGR follows the appendix literally: ``sign(y) == sign(y_hat)`` with ``sign(0) = 0``,
  so a zero label agrees only with an exactly-zero prediction. This keeps values
  comparable with the paper (the released code counted zero labels as disagreements
  unconditionally; the two differ only when label and prediction are both exactly 0).
- PCC of a constant input (zero variance) is undefined; it is reported as 0.0 (no
  measurable linear association) rather than NaN, which would poison model selection.
- CCC uses ``2 cov / (var_y + var_p + (mean_y - mean_p)^2)``, equal to the appendix
  formula; it is 0 when exactly one input is constant and 1 when both are the same
  constant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data.base import normalize

__all__ = ["ccc", "evaluate", "identity_share", "pcc", "predict", "rmse", "sagr", "va_metrics"]


def _as_float64(name: str, x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be numeric (array-like or tensor), got {type(x).__name__}"
        ) from err


def _pair(pred: object, target: object) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_float64("pred", pred), _as_float64("target", target)
    if p.ndim != 1 or p.shape != t.shape or p.size == 0:
        raise ValueError(
            f"`pred` and `target` must be non-empty 1-D arrays of the same length, "
            f"got shapes {p.shape} and {t.shape}"
        )
    return p, t


def rmse(pred: object, target: object) -> float:
    """Root mean-squared error ``sqrt(mean((y - y_hat)^2))``.

    Args:
        pred: predictions ``(N,)`` (array-like or tensor).
        target: ground truth ``(N,)``.

    Returns:
        The RMSE.

    Example:
        >>> rmse([0.0, 1.0], [0.0, 0.0])
        0.7071067811865476
    """
    p, t = _pair(pred, target)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def sagr(pred: object, target: object) -> float:
    """Sign agreement rate ``mean(sign(y) == sign(y_hat))`` (``sign(0) = 0``).

    Args:
        pred: predictions ``(N,)``.
        target: ground truth ``(N,)``.

    Returns:
        Fraction in [0, 1].

    Example:
        >>> sagr([0.3, -0.2, 0.1, 0.5], [0.4, 0.1, 0.0, 0.2])
        0.5
    """
    p, t = _pair(pred, target)
    return float(np.mean(np.sign(p) == np.sign(t)))


def pcc(pred: object, target: object) -> float:
    """Pearson correlation ``E[(y - mean_y)(p - mean_p)] / (std_y std_p)``, ddof=0.

    Args:
        pred: predictions ``(N,)``.
        target: ground truth ``(N,)``.

    Returns:
        The correlation in [-1, 1]; 0.0 if either input is constant.

    Example:
        >>> round(pcc([1.0, 2.0, 4.0], [2.0, 4.0, 8.0]), 12)
        1.0
    """
    p, t = _pair(pred, target)
    dp, dt = p - p.mean(), t - t.mean()
    denom = np.sqrt(np.mean(dp**2) * np.mean(dt**2))
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.mean(dp * dt) / denom, -1.0, 1.0))


def ccc(pred: object, target: object) -> float:
    """Concordance correlation ``2 cov / (var_y + var_p + (mean_y - mean_p)^2)``, ddof=0.

    Args:
        pred: predictions ``(N,)``.
        target: ground truth ``(N,)``.

    Returns:
        The concordance in [-1, 1].

    Example:
        >>> ccc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
        1.0
    """
    p, t = _pair(pred, target)
    mp, mt = p.mean(), t.mean()
    dp, dt = p - mp, t - mt
    denom = np.mean(dp**2) + np.mean(dt**2) + (mp - mt) ** 2
    if denom == 0.0:  # both the same constant: perfect agreement
        return 1.0
    return float(2.0 * np.mean(dp * dt) / denom)


def va_metrics(pred: object, target: object) -> dict[str, float]:
    """All metrics for valence (column 0) and arousal (column 1).

    Args:
        pred: predictions ``(N, 2)`` for the WHOLE evaluation set (array or tensor).
        target: ground truth ``(N, 2)``.

    Returns:
        ``{"rmse_v", "rmse_a", "sagr_v", "sagr_a", "pcc_v", "pcc_a", "ccc_v", "ccc_a"}``
        as Python floats.

    Example:
        >>> y = np.array([[0.1, -0.2], [0.4, 0.3], [-0.5, 0.2]])
        >>> m = va_metrics(y, y)
        >>> m["rmse_v"], m["ccc_a"], m["sagr_v"]
        (0.0, 1.0, 1.0)
    """
    p, t = _as_float64("pred", pred), _as_float64("target", target)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape != t.shape:
        raise ValueError(
            f"`pred` and `target` must both have shape (N, 2), got {p.shape} and {t.shape}"
        )
    out: dict[str, float] = {}
    for name, fn in (("rmse", rmse), ("sagr", sagr), ("pcc", pcc), ("ccc", ccc)):
        out[f"{name}_v"] = fn(p[:, 0], t[:, 0])
        out[f"{name}_a"] = fn(p[:, 1], t[:, 1])
    return out


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset,
    indices: torch.Tensor,
    images: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels ``(n, 2)`` of ``dataset[indices]``, in eval mode.

    Args:
        model: the (possibly DDP-wrapped) :class:`elim.models.ELIMModel`.
        dataset: evaluation dataset (centre-cropped uint8 images).
        indices: which samples (this rank's shard).
        images: cached ``(N, 3, S, S)`` uint8 images or ``None`` (DataLoader).
        device: where to run.
        batch_size: evaluation batch size.
        workers: DataLoader workers when not cached.
    """
    core = getattr(model, "module", model)
    was_training = core.training
    core.eval()
    preds = []
    if images is not None:
        chunks = (images[idx] for idx in indices.split(batch_size))
    else:
        subset = torch.utils.data.Subset(dataset, indices.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers)
        chunks = (x for x, _, _ in loader)
    for x in chunks:
        preds.append(core(normalize(x.to(device)))[1].float().cpu())
    core.train(was_training)
    out = torch.cat(preds) if preds else torch.zeros(0, 2)
    return out, dataset.labels[indices]


def evaluate(
    model: nn.Module,
    dataset,
    images: torch.Tensor | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics over the WHOLE held-out set, each rank predicting a strided shard.

    Returns:
        ``(metrics, predictions, labels)``; predictions and labels ``(N, 2)`` are
        gathered from every rank and put back in dataset order, so every rank returns
        the same metrics.
    """
    from .distributed import gather_rows

    shard = torch.arange(rank, len(dataset), world_size)
    pred, true = predict(model, dataset, shard, images, device, workers=workers)
    order = gather_rows(shard.to(device)).cpu().argsort()
    pred = gather_rows(pred.to(device)).cpu()[order]
    true = gather_rows(true.to(device)).cpu()[order]
    return va_metrics(pred, true), pred, true


def identity_share(values: torch.Tensor, identities: torch.Tensor) -> list[float]:
    """Share of the variance of each column that lies *between* identities (eta squared).

    On held-out identities whose labels do not depend on who they are, the labels'
    share is near 0; a regressor that relies on identity cues (skin, hair, background)
    makes predictions that are nearly constant per identity, so their share is large.
    This is the diagnostic of identity shortcuts reported in ``eval_log.jsonl``.

    Args:
        values: ``(N, C)`` predictions or labels.
        identities: ``(N,)`` integer identity of each row.

    Returns:
        ``C`` shares in [0, 1] (0 for a constant column).

    Example:
        >>> ids = torch.tensor([0, 0, 1, 1])
        >>> identity_share(torch.tensor([[1.0], [1.0], [3.0], [3.0]]), ids)
        [1.0]
        >>> identity_share(torch.tensor([[1.0], [3.0], [1.0], [3.0]]), ids)
        [0.0]
    """
    values = values.double()
    _, codes = torch.unique(identities, return_inverse=True)
    count = torch.bincount(codes).double().unsqueeze(1)  # (E, 1)
    sums = torch.zeros(count.shape[0], values.shape[1], dtype=values.dtype)
    means = sums.index_add(0, codes, values) / count  # (E, C)
    total = (values - values.mean(0)).pow(2).sum(0)
    between = (count * (means - values.mean(0)).pow(2)).sum(0)
    return [float(b / t) if t > 0 else 0.0 for b, t in zip(between, total)]
