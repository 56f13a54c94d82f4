"""Result plots (matplotlib, Agg backend: no display needed) and the printed results table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["METRIC_NAMES", "format_results_table", "plot_training_curves", "plot_va_scatter"]

METRIC_NAMES = ("rmse", "sagr", "pcc", "ccc")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def format_results_table(metrics: Mapping[str, float], title: str = "held-out identities") -> str:
    """A fixed-width table of RMSE, SAGR, PCC and CCC for valence and arousal.

    Args:
        metrics: the dict of :func:`elim.metrics.va_metrics`.
        title: first line of the table.

    Returns:
        The table as text (also valid Markdown).

    Example:
        >>> m = {f"{k}_{a}": 0.5 for k in METRIC_NAMES for a in "va"}
        >>> print(format_results_table(m, "test"))
        | test     |   RMSE |   SAGR |    PCC |    CCC |
        |----------|--------|--------|--------|--------|
        | valence  |  0.500 |  0.500 |  0.500 |  0.500 |
        | arousal  |  0.500 |  0.500 |  0.500 |  0.500 |
    """
    head = f"| {title:<8} |" + "".join(f" {n.upper():>6} |" for n in METRIC_NAMES)
    rule = "|" + "-" * (max(len(title), 8) + 2) + "|" + "--------|" * len(METRIC_NAMES)
    rows = [head, rule]
    for axis, name in (("v", "valence"), ("a", "arousal")):
        cells = "".join(f" {metrics[f'{m}_{axis}']:6.3f} |" for m in METRIC_NAMES)
        rows.append(f"| {name:<{max(len(title), 8)}} |{cells}")
    return "\n".join(rows)


def plot_va_scatter(pred: np.ndarray, true: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Predicted against true valence and arousal, one panel each, with the identity line.

    Args:
        pred: ``(N, 2)`` predictions.
        true: ``(N, 2)`` ground truth.
        path: output image file (``.png``).
        title: figure title.

    Returns:
        ``path``.
    """
    from .metrics import ccc, rmse

    plt = _pyplot()
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), constrained_layout=True)
    for ax, col, name in zip(axes, (0, 1), ("valence", "arousal")):
        ax.scatter(true[:, col], pred[:, col], s=6, alpha=0.45, edgecolors="none")
        ax.plot([-1, 1], [-1, 1], color="k", lw=0.8, ls="--")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(
            f"{name}: CCC {ccc(pred[:, col], true[:, col]):.3f}, "
            f"RMSE {rmse(pred[:, col], true[:, col]):.3f}"
        )
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return np.asarray(out)


def plot_training_curves(
    train_log: Sequence[Mapping], eval_log: Sequence[Mapping], path: str | Path, title: str = ""
) -> Path:
    """Step losses (raw and smoothed) and held-out CCC over training.

    Args:
        train_log: records with ``step``, ``loss_main`` and ``loss_elim``.
        eval_log: records with ``step``, ``ccc_v`` and ``ccc_a`` (may be empty).
        path: output image file.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    steps = [r["step"] for r in train_log]
    for key, label, colour in (
        ("loss_main", "main loss", "C0"),
        ("loss_elim", "ELIM loss (weighted)", "C1"),
    ):
        values = [r.get(key, 0.0) for r in train_log]
        if not any(values):
            continue
        ax_loss.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
        ax_loss.plot(steps, _smooth(values), color=colour, label=label)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training losses")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend()
    if eval_log:
        e_steps = [r["step"] for r in eval_log]
        for key, label in (("ccc_v", "CCC valence"), ("ccc_a", "CCC arousal")):
            ax_eval.plot(e_steps, [r[key] for r in eval_log], marker="o", label=label)
        ax_eval.legend()
    ax_eval.set_xlabel("iteration")
    ax_eval.set_ylabel("CCC")
    ax_eval.set_title("held-out identities")
    ax_eval.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
