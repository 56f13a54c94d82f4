"""Result plots (matplotlib, Agg backend: no display needed) and the printed results table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "METRIC_NAMES",
    "format_results_table",
    "plot_identity_shift",
    "plot_method_curves",
    "plot_training_curves",
    "plot_tsne",
    "plot_va_scatter",
]

METRIC_NAMES = ("rmse", "sagr", "pcc", "ccc")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str, dpi: int) -> Path:
    """Title (if any), write ``path`` as PNG, free the figure; returns ``Path(path)``."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


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
    return _save(fig, path, title, dpi=110)


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
    return _save(fig, path, title, dpi=110)


def plot_tsne(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Side-by-side 2-D embeddings coloured by valence, one marker per identity.

    Args:
        panels: ``{panel title: (embedding (N, 2), valence (N,), identity (N,))}``.
        path: output ``.png``.
        title: figure title.
        dpi: resolution (100 keeps the committed PNGs small).

    Returns:
        ``path``.

    Example:
        >>> import tempfile
        >>> e, v, i = np.zeros((4, 2)), np.linspace(-1, 1, 4), np.array([0, 0, 1, 1])
        >>> plot_tsne({"a": (e, v, i)}, tempfile.mktemp(suffix=".png")).suffix
        '.png'
    """
    plt = _pyplot()
    markers = "osD^vP*Xh<>p"
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 4.4), constrained_layout=True, squeeze=False
    )
    scatter = None
    for ax, (name, (emb, valence, ids)) in zip(axes[0], panels.items()):
        emb, valence, ids = np.asarray(emb), np.asarray(valence), np.asarray(ids)
        for k, identity in enumerate(np.unique(ids)):
            rows = ids == identity
            scatter = ax.scatter(
                emb[rows, 0],
                emb[rows, 1],
                c=valence[rows],
                cmap="coolwarm",
                vmin=-1,
                vmax=1,
                s=14,
                marker=markers[k % len(markers)],
                edgecolors="none",
            )
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes[0]), label="true valence", shrink=0.8)
    return _save(fig, path, title, dpi=dpi)


def plot_identity_shift(
    pairs: Sequence[tuple[int, int]],
    images: np.ndarray,
    labels: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Appendix Fig. 1: per pair, the two faces and every method's VA predictions.

    Each row is one pair of images of different people with similar labels: the two
    faces, then the valence-arousal plane with the true labels (stars) and each
    method's predictions (one colour per method, circle = left face, square = right
    face, joined by a line: the longer the line, the more the prediction moved with the
    identity alone).

    Args:
        pairs: ``[(i, j), ...]`` row indices (see :func:`elim.analysis.shift_pairs`).
        images: ``(N, 3, S, S)`` uint8 or ``(N, S, S, 3)`` images.
        labels: ``(N, 2)`` true valence, arousal.
        predictions: ``{method: (N, 2) predictions}``.
        path: output ``.png``.
        title: figure title.
        dpi: resolution.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    labels = np.asarray(labels, dtype=float)
    fig, axes = plt.subplots(
        len(pairs),
        3,
        figsize=(8.4, 2.9 * len(pairs)),
        gridspec_kw={"width_ratios": [1, 1, 1.5]},
        constrained_layout=True,
        squeeze=False,
    )
    for row, (i, j) in enumerate(pairs):
        for col, k in enumerate((i, j)):
            ax = axes[row, col]
            ax.imshow(images[k])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"V {labels[k, 0]:+.2f}, A {labels[k, 1]:+.2f}", fontsize=9)
        ax = axes[row, 2]
        ax.scatter(*labels[[i, j]].T, marker="*", s=140, c="k", label="true", zorder=3)
        for n, (method, pred) in enumerate(predictions.items()):
            pred = np.asarray(pred, dtype=float)
            colour = f"C{n}"
            ax.plot(*pred[[i, j]].T, color=colour, lw=1)
            ax.scatter(*pred[i], marker="o", color=colour, s=40, label=method)
            ax.scatter(*pred[j], marker="s", color=colour, s=40)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("valence", fontsize=9)
        ax.set_ylabel("arousal", fontsize=9)
        if row == 0:
            ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path, title, dpi=dpi)


def plot_method_curves(
    logs: Mapping[str, Sequence[tuple[Sequence[Mapping], Sequence[Mapping]]]],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Training curves of several methods: smoothed main loss, ELIM loss, held-out CCC.

    Curves are averaged over the runs (seeds) of a method; the held-out panel shows the
    mean CCC ``(CCC_v + CCC_a) / 2`` at every evaluation, with the seed range shaded.

    Args:
        logs: ``{method: [(train_log records, eval_log records) per run]}``.
        path: output ``.png``.
        title: figure title.
        dpi: resolution.

    Returns:
        ``path``.

    Example:
        >>> import tempfile
        >>> run = ([{"step": s, "loss_main": 1.0 / s, "loss_elim": 0.0} for s in (1, 2)],
        ...        [{"step": 2, "ccc_v": 0.1, "ccc_a": 0.3}])
        >>> plot_method_curves({"baseline": [run]}, tempfile.mktemp(suffix=".png")).suffix
        '.png'
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for n, (method, runs) in enumerate(logs.items()):
        colour = f"C{n}"
        for ax, key in zip(axes[:2], ("loss_main", "loss_elim")):
            length = min(len(t) for t, _ in runs)
            if length == 0:
                continue
            values = np.mean([[r.get(key, 0.0) for r in t[:length]] for t, _ in runs], axis=0)
            if not values.any():
                continue
            ax.plot(
                [r["step"] for r in runs[0][0][:length]],
                _smooth(values),
                color=colour,
                label=method,
            )
        length = min(len(e) for _, e in runs)
        if length:
            steps = [r["step"] for r in runs[0][1][:length]]
            ccc = np.array([[(r["ccc_v"] + r["ccc_a"]) / 2 for r in e[:length]] for _, e in runs])
            axes[2].plot(steps, ccc.mean(0), marker="o", color=colour, label=method)
            axes[2].fill_between(steps, ccc.min(0), ccc.max(0), color=colour, alpha=0.15)
    for ax, name in zip(
        axes, ("main loss (smoothed)", "ELIM loss, weighted (smoothed)", "held-out mean CCC")
    ):
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path, title, dpi=dpi)
