"""Post-hoc analysis of trained runs: frozen features, linear probes, identity-shift pairs.

The probes ask two questions of the encoder's features ``z = f_phi(x)`` on the
held-out identities, with the trained network frozen:

* **identity probe** (:func:`identity_probe`): how well does a linear classifier
  (logistic regression) tell the held-out *people* apart? Cross-validated within the
  held-out set, stratified by identity (every person appears in every training fold).
  Lower = more identity-invariant features; chance is one over the number of people.
* **valence/arousal probe** (:func:`va_probe`): how much of the label variance does a
  linear regression (ridge) explain? Cross-validated with *identity-disjoint* folds, so
  a probe cannot score by remembering a person. Higher is better.

:func:`load_trained` rebuilds a model from a run folder's ``checkpoint.pt``;
:func:`heldout_set` rebuilds its held-out images with identities as domains (an ELIM-Age
run matched age groups, but the probes and figures need the people).
``examples/elim/figures.py`` turns these into the figures and the probe table.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import TrainConfig
from .data import pipeline
from .data.base import normalize
from .losses import elim_loss
from .models import ELIMModel, build_model

__all__ = [
    "elim_loss_reach",
    "extract",
    "heldout_set",
    "identity_probe",
    "load_trained",
    "shift_pairs",
    "tsne_embedding",
    "va_probe",
    "write_marked_block",
]


def load_trained(run_dir: str | Path) -> tuple[TrainConfig, ELIMModel]:
    """The config and the trained model (eval mode, CPU) of a ``train.py`` output folder.

    Args:
        run_dir: a folder holding ``checkpoint.pt``.

    Returns:
        ``(config, model)``.

    Raises:
        ValueError: no checkpoint in ``run_dir``.

    Example:
        >>> cfg, model = load_trained("examples/elim/runs/elim")  # doctest: +SKIP
        >>> model.encoder(torch.zeros(1, 3, 64, 64)).shape       # doctest: +SKIP
        torch.Size([1, 64])
    """
    path = Path(run_dir) / checkpoint.CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"`run_dir` must hold {checkpoint.CHECKPOINT_NAME}, got {run_dir}")
    state = checkpoint.load(path)
    cfg = TrainConfig.from_dict(state["config"])
    # Never re-read --pretrained weights: the checkpoint already holds the trained ones.
    model = build_model(dataclasses.replace(cfg, pretrained=None))
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def heldout_set(cfg: TrainConfig, data_root: str | Path | None = None):
    """Held-out dataset of a run and its cached uint8 images ``(N, 3, S, S)``.

    The domains are always the identities (``domain="identity"``), whatever the run
    matched; on AffectNet (no identities) use ``domain`` ``auto`` yourself instead.

    Args:
        cfg: the run's config (from :func:`load_trained`).
        data_root: data folder; default ``cfg.data_root`` or the synthetic default.

    Returns:
        ``(dataset, images)``; ``dataset.identities`` is ``(N,)`` int64, ``labels``
        ``(N, 2)``.
    """
    root = data_root or cfg.data_root or pipeline.default_data_root(cfg.data, cfg.confounding)
    cfg = dataclasses.replace(cfg, domain="identity")
    _, evaluation = pipeline.build_training_data(cfg, root)
    return evaluation, pipeline.preload(evaluation, 0, Path(root) / ".elim_cache")


@torch.no_grad()
def extract(
    model: ELIMModel, images: torch.Tensor, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features and predictions of uint8 images, in eval mode.

    Args:
        model: a trained :class:`elim.models.ELIMModel`.
        images: ``(N, 3, S, S)`` uint8 (as :func:`heldout_set` returns).
        batch_size: images per forward pass.

    Returns:
        ``(features (N, D), predictions (N, 2))`` as float64 arrays.

    Example:
        >>> from elim.models import Projector
        >>> m = ELIMModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)),
        ...                 Projector(4))
        >>> z, y = extract(m, torch.zeros(5, 3, 2, 2, dtype=torch.uint8))
        >>> z.shape, y.shape
        ((5, 4), (5, 2))
    """
    was_training = model.training
    model.eval()
    feats, preds = [], []
    for chunk in images.split(batch_size):
        z, y = model(normalize(chunk))
        feats.append(z.double())
        preds.append(y.double())
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def _check_rows(name: str, array: np.ndarray, n: int | None, ndim: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != ndim or (n is not None and array.shape[0] != n):
        want = f"{ndim}-D with {n} rows" if n is not None else f"{ndim}-D"
        raise ValueError(f"`{name}` must be {want}, got shape {array.shape}")
    return array


def identity_probe(
    features: np.ndarray, identities: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Cross-validated accuracy of a linear classifier predicting the identity.

    Standardised features -> multinomial logistic regression (L2, ``C = 1``), stratified
    ``folds``-fold split of the samples (each identity in every fold; capped at the
    smallest identity's sample count).

    Args:
        features: ``(N, D)`` frozen features.
        identities: ``(N,)`` integer identity of each row (at least 2 distinct).
        folds: number of folds.
        seed: seed of the fold shuffle.

    Returns:
        ``{"accuracy": mean over folds, "accuracy_std": std over folds, "chance":
        frequency of the most common identity, "n_identities": ...}``.

    Example:
        >>> ids = np.repeat(np.arange(4), 10)
        >>> identity_probe(np.eye(4)[ids], ids)["accuracy"]   # one-hot identity features
        1.0
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    identities = _check_rows("identities", identities, None, 1)
    features = _check_rows("features", features, len(identities), 2)
    _, counts = np.unique(identities, return_counts=True)
    if len(counts) < 2:
        raise ValueError(f"`identities` must hold at least 2 distinct values, got {len(counts)}")
    k = min(folds, int(counts.min()))
    if k < 2:
        raise ValueError(
            f"every identity needs >= 2 samples for a cross-validated probe, got {counts.min()}"
        )
    # A loose tolerance: the accuracy settles long before lbfgs's default 1e-4 (about
    # 5x faster, which matters for 12 runs on 2 cores; the probe is a diagnostic).
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, tol=1e-3))
    split = StratifiedKFold(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # max_iter may bind at tol 1e-3; the score has settled
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(probe, features, identities, cv=split, scoring="accuracy")
    return {
        "accuracy": float(scores.mean()),
        "accuracy_std": float(scores.std()),
        "chance": float(counts.max() / counts.sum()),
        "n_identities": len(counts),
    }


def va_probe(
    features: np.ndarray,
    labels: np.ndarray,
    identities: np.ndarray,
    folds: int = 4,
    alphas: tuple[float, ...] = tuple(np.logspace(-2, 4, 13)),
) -> dict[str, float]:
    """Cross-validated R² of a linear (ridge) regression of valence and arousal.

    Standardised features -> ridge, identity-disjoint folds (``GroupKFold``, capped at
    the number of identities); R² is computed once over the pooled out-of-fold
    predictions, per axis. The ridge penalty is chosen from ``alphas`` by an inner
    identity-disjoint split of each training fold, never on the test fold (a fixed or
    leave-one-image-out penalty fits the training people and extrapolates wildly to
    new ones).

    Args:
        features: ``(N, D)`` frozen features.
        labels: ``(N, 2)`` valence and arousal.
        identities: ``(N,)`` identity of each row (the groups of the folds).
        folds: number of folds.
        alphas: candidate ridge penalties.

    Returns:
        ``{"r2_v": ..., "r2_a": ...}`` (can be negative: worse than the mean).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.uniform(-1, 1, (60, 2))
        >>> ids = np.repeat(np.arange(6), 10)
        >>> r = va_probe(np.c_[y, rng.normal(size=(60, 3))], y, ids)
        >>> r["r2_v"] > 0.99 and r["r2_a"] > 0.99
        True
    """
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    identities = _check_rows("identities", identities, None, 1)
    features = _check_rows("features", features, len(identities), 2)
    labels = _check_rows("labels", labels, len(identities), 2)
    k = min(folds, len(np.unique(identities)))
    if k < 2:
        raise ValueError("`identities` must hold at least 2 distinct values for the folds")

    def fit(x, y, alpha):
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, y)

    pred = np.zeros(labels.shape, dtype=float)
    for train, test in GroupKFold(k).split(features, labels, identities):
        alpha = alphas[0]
        inner_k = min(k, len(np.unique(identities[train])))
        if len(alphas) > 1 and inner_k >= 2:
            # Nested and also identity-disjoint: the penalty is judged on unseen people.
            errors = np.zeros(len(alphas))
            for a, b in GroupKFold(inner_k).split(train, groups=identities[train]):
                for n, candidate in enumerate(alphas):
                    model = fit(features[train[a]], labels[train[a]], candidate)
                    residual = model.predict(features[train[b]]) - labels[train[b]]
                    errors[n] += (residual**2).sum()
            alpha = alphas[int(errors.argmin())]
        pred[test] = fit(features[train], labels[train], alpha).predict(features[test])
    return {
        "r2_v": float(r2_score(labels[:, 0], pred[:, 0])),
        "r2_a": float(r2_score(labels[:, 1], pred[:, 1])),
    }


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialisation) of standardised features.

    Args:
        features: ``(N, D)``, ``N >= 4``.
        seed: random state.

    Returns:
        ``(N, 2)``.

    Example:
        >>> tsne_embedding(np.random.default_rng(0).normal(size=(20, 5))).shape
        (20, 2)
    """
    from sklearn.manifold import TSNE

    features = _check_rows("features", features, None, 2)
    if len(features) < 4:
        raise ValueError(f"`features` needs >= 4 rows for t-SNE, got {len(features)}")
    scaled = (features - features.mean(0)) / (features.std(0) + 1e-12)
    # Perplexity must stay below the sample count (only binds on tiny test sets).
    perplexity = min(30.0, (len(features) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(scaled)


def shift_pairs(
    labels: np.ndarray, identities: np.ndarray, n_pairs: int = 3
) -> list[tuple[int, int]]:
    """Pairs of samples of *different* identities with the most similar labels.

    The pairs are chosen from the labels alone (never from any model's predictions),
    greedily by smallest valence-arousal distance, each identity used at most once, so
    that the figure is not cherry-picked for either method.

    Args:
        labels: ``(N, 2)`` valence and arousal.
        identities: ``(N,)`` identity of each row.
        n_pairs: pairs wanted (fewer if identities run out).

    Returns:
        ``[(i, j), ...]`` row indices, closest pair first.

    Example:
        >>> y = np.array([[0.0, 0.0], [0.5, 0.5], [0.01, 0.0], [0.9, -0.9]])
        >>> shift_pairs(y, np.array([0, 0, 1, 1]), n_pairs=2)
        [(0, 2)]
    """
    identities = _check_rows("identities", identities, None, 1)
    labels = _check_rows("labels", labels, len(identities), 2)
    dist = np.linalg.norm(labels[:, None, :] - labels[None, :, :], axis=-1)
    dist[identities[:, None] == identities[None, :]] = np.inf  # different people only
    pairs, used = [], set()
    for flat in np.argsort(dist, axis=None):
        i, j = np.unravel_index(flat, dist.shape)
        if len(pairs) == n_pairs or not np.isfinite(dist[i, j]):
            break
        if i < j and identities[i] not in used and identities[j] not in used:
            pairs.append((int(i), int(j)))
            used.update((identities[i], identities[j]))
    return pairs


def write_marked_block(path: str | Path, block: str, name: str) -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` of a
    Markdown file (appending the marked block if the markers are absent).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "R.md"
        >>> _ = p.write_text("intro\\n")
        >>> write_marked_block(p, "one", "probes"); write_marked_block(p, "two", "probes")
        >>> p.read_text()
        'intro\\n\\n<!-- probes:begin -->\\ntwo\\n<!-- probes:end -->\\n'
    """
    import re

    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else ""
    new = f"{begin}\n{block.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)


def elim_loss_reach(
    projector: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    per_domain: bool = True,
) -> list[float]:
    """How much of the ELIM loss's gradient can move each identity's mean feature.

    For every domain ``e`` of a matched batch, ``||sum_j g_j|| / sum_j ||g_j||`` with
    ``g_j`` the gradient of :func:`elim.losses.elim_loss` w.r.t. the matched feature of
    sample ``j``: 1 when all samples are pushed the same way (the identity's mean moves),
    0 when the pushes cancel (only the variation within the identity changes). With the
    projector run once per identity (``per_domain=True``, the paper) its BatchNorm
    removes each identity's mean, so the ratio is 0 up to rounding.

    Args:
        projector: ``f_theta`` in train mode.
        features: ``(E, L, D)`` matched features (:class:`elim.matching.MatchedBatch`).
        labels: ``(E, L, 2)``.
        mask: ``(E, L)`` bool.
        per_domain: one projector call per domain, or one for all.

    Returns:
        ``E`` ratios in [0, 1], reference first.

    Example:
        >>> from elim.models import Projector
        >>> z, y = torch.randn(3, 6, 8), torch.randn(3, 6, 2)
        >>> mask = torch.ones(3, 6, dtype=torch.bool)
        >>> max(elim_loss_reach(Projector(8), z, y, mask)) < 1e-5
        True
    """
    feats = features.detach().clone().requires_grad_(True)
    loss = elim_loss(projector, feats, labels, mask, per_domain=per_domain)
    (grad,) = torch.autograd.grad(loss, feats)
    ratios = []
    for g, m in zip(grad, mask):
        g = g[m]
        total = g.norm(dim=1).sum()
        ratios.append(float(g.sum(0).norm() / total) if total > 0 else 0.0)
    return ratios
