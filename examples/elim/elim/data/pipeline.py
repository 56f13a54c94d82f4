"""The training data pipeline: dataset pair, cached images, P x K batches.

``train.py`` calls, in order: :func:`default_data_root` (where synthetic data lives),
:func:`build_training_data` (train and evaluation datasets with the one image pipeline
of :func:`elim.data.base.make_transform`), :func:`preload` (decode every image once,
also cached on disk), :func:`make_sampler` (the identity-aware P x K batch sampler,
with a batch layout that fits the data's domains) and, per epoch, :class:`Batches`.
The random half of the augmentation (:func:`elim.data.base.augment`) runs per batch
on the device from an explicit generator, so augmentation does not depend on
DataLoader workers, and a resumed run draws exactly the batches that an uninterrupted
run would.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..config import CONFOUNDING_LEVELS, DEFAULT_SAMPLES_PER_IDENTITY, TrainConfig
from . import build_datasets
from .base import make_transform
from .sampler import AGE_GROUP_EDGES, DistributedIdentityBatchSampler
from .synthetic import SyntheticConfig

__all__ = [
    "BatchLayout",
    "Batches",
    "batch_layout",
    "build_training_data",
    "check_age_domain",
    "default_data_root",
    "make_sampler",
    "preload",
    "should_cache",
]

EXAMPLE_DIR = Path(__file__).resolve().parents[2]


def default_data_root(kind: str, confounding: str = "partial") -> Path:
    """``examples/elim/data_cache/synthetic-<confounding>`` for synthetic data (git-ignored)."""
    if kind != "synthetic":
        raise ValueError(f"--data {kind} needs --data-root (the dataset folder)")
    return EXAMPLE_DIR / "data_cache" / f"synthetic-{confounding}"


def build_training_data(cfg: TrainConfig, data_root: str | Path):
    """Train and held-out datasets of ``cfg.data`` with the deterministic uint8 transforms.

    Training images come out as ``(3, R, R)`` uint8 with ``R = round(S * 256/224)`` (the
    released pipeline's resize; non-square images are centre-cropped to a square);
    evaluation images as ``(3, S, S)`` uint8, the released centre crop. Synthetic data
    is generated with the confounding level ``cfg.confounding`` (``synthetic_overrides``
    may change any generator field). With ``cfg.validation_identities = N`` the last N
    training domains become the evaluation set and are left out of training: a
    validation split for choosing a recipe without looking at the held-out people.
    """
    train_tf = make_transform(cfg.image_size, train=True)
    eval_tf = make_transform(cfg.image_size, train=False)
    synthetic = SyntheticConfig(
        **{**CONFOUNDING_LEVELS[cfg.confounding], **cfg.synthetic_overrides}
    )
    train, evaluation = build_datasets(
        cfg.data,
        data_root,
        cfg.image_size,
        domain=cfg.domain,
        age_file=cfg.age_file,
        synthetic_config=synthetic,
        identity=cfg.identity,
        train_transform=train_tf,
        eval_transform=eval_tf,
    )
    if cfg.domain == "age":
        check_age_domain(train, "train")
        check_age_domain(evaluation, "eval")
    if cfg.validation_identities:
        names = sorted(set(train.identities.tolist()))
        if not 0 < cfg.validation_identities < len(names):
            raise ValueError(
                f"`validation_identities` must be in [1, {len(names) - 1}] (the training "
                f"split has {len(names)} domains), got {cfg.validation_identities}"
            )
        held = torch.isin(train.identities, torch.tensor(names[-cfg.validation_identities :]))
        evaluation = train.subset(held.nonzero().flatten().tolist(), eval_tf)
        train = train.subset((~held).nonzero().flatten().tolist())
    return train, evaluation


def check_age_domain(dataset, split: str = "train") -> None:
    """With ``--domain age`` (ELIM-Age), every image needs an age in ``[18, 85)``.

    The data layer maps ages outside the five groups of appendix §4.4 to the nearest
    group (:func:`elim.data.age_group` clamps); a training run that asked for ELIM-Age
    instead stops with the first offending image, so that children or typos never end
    up silently in the 18-29 group.

    Args:
        dataset: a dataset of :mod:`elim.data` (``ages`` is ``(N,)`` int64 or ``None``).
        split: ``"train"`` or ``"eval"``, for the message.

    Raises:
        ValueError: ``ages`` is ``None``, or an age lies outside ``[18, 85)``.

    Example:
        >>> class Toy:
        ...     ages = torch.tensor([18, 29, 84])
        >>> check_age_domain(Toy())          # fine: nothing raised
        >>> Toy.ages = torch.tensor([30, 17])
        >>> Toy.location = lambda self, i: f"row {i}"
        >>> check_age_domain(Toy())
        Traceback (most recent call last):
        ...
        ValueError: --domain age needs ages in [18, 85) (the five ELIM-Age groups); train split, row 1: got age 17
    """
    low, high = AGE_GROUP_EDGES[0], AGE_GROUP_EDGES[-1]
    ages = getattr(dataset, "ages", None)
    if ages is None:
        raise ValueError(
            f"--domain age needs an age for every image; the {split} split has none "
            "(give --age-file, or an ages.csv beside the CSV data)"
        )
    bad = ((ages < low) | (ages >= high)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        where = dataset.location(i) if hasattr(dataset, "location") else f"image {i}"
        raise ValueError(
            f"--domain age needs ages in [{low}, {high}) (the five ELIM-Age groups); "
            f"{split} split, {where}: got age {int(ages[i])}"
            + (f" ({len(bad)} images out of range)" if len(bad) > 1 else "")
        )


def preload(
    dataset, workers: int = 0, cache_dir: str | Path | None = None, batch_size: int = 128
) -> torch.Tensor:
    """Decode and transform every image once: ``(N, 3, H, W)`` uint8, dataset order.

    With ``cache_dir``, the tensor is also stored there (keyed by the label file, its
    modification time, the image list and the transform) and read back by later runs,
    which saves the decoding time (about 20 s for the synthetic set on 2 cores). A
    cache that cannot be written (read-only data folder) is skipped silently.

    Args:
        dataset: a dataset of :mod:`elim.data` with deterministic transforms.
        workers: DataLoader workers for decoding.
        cache_dir: folder of the on-disk cache, or ``None``.
        batch_size: decoding batch size.
    """
    cache_file, key = None, None
    if cache_dir is not None:
        key = json.dumps(
            {
                "source": str(dataset.source),
                "mtime_ns": os.stat(dataset.source).st_mtime_ns,
                "n": len(dataset),
                "paths": hashlib.sha1("\n".join(map(str, dataset.paths)).encode()).hexdigest(),
                "transform": repr(dataset.transform),
            },
            sort_keys=True,
        )
        cache_file = Path(cache_dir) / f"images_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
        if cache_file.is_file():
            try:
                stored = torch.load(cache_file, map_location="cpu", weights_only=True)
                if stored.get("key") == key:
                    return stored["images"]
            except (OSError, RuntimeError, ValueError, EOFError):
                pass  # unreadable or partial: rebuild it
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    images = torch.cat([x for x, _, _ in loader])
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            torch.save({"key": key, "images": images}, tmp)
            os.replace(tmp, cache_file)  # atomic: concurrent ranks never read half a file
        except OSError:
            pass
    return images


def should_cache(mode: str, n_images: int, side: int, limit_bytes: int = 2 << 30) -> bool:
    """``"on"``/``"off"``, or ``"auto"``: cache when the uint8 images fit in ``limit_bytes``."""
    if mode != "auto":
        return mode == "on"
    return n_images * 3 * side * side <= limit_bytes


class Batches:
    """The training batches of one epoch, from the cache or a DataLoader.

    Args:
        dataset: the training dataset (uniform interface of :mod:`elim.data`).
        sampler: a P x K batch sampler (``set_epoch`` already called).
        images: the cached ``(N, 3, R, R)`` uint8 images, or ``None`` to load through
            a DataLoader with ``workers`` processes.
        workers: DataLoader workers when not cached.
        skip: batches of this epoch already done (resume); they are drawn from the
            sampler but never loaded.
    """

    def __init__(self, dataset, sampler, images: torch.Tensor | None, workers: int, skip: int = 0):
        self.dataset, self.sampler, self.images = dataset, sampler, images
        self.workers, self.skip = workers, skip

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        index_lists = itertools.islice(iter(self.sampler), self.skip, None)
        if self.images is not None:
            for idx in index_lists:
                idx = torch.as_tensor(idx)
                yield self.images[idx], self.dataset.labels[idx], self.dataset.identities[idx]
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=list(index_lists), num_workers=self.workers
        )
        yield from loader


class BatchLayout(NamedTuple):
    """P x K batch layout: ``domains`` per batch x ``samples`` per domain, and a note
    for the log when it was adapted to the data (``None`` otherwise)."""

    domains: int
    samples: int
    note: str | None


def _too_few_domains(cfg: TrainConfig, kind: str, available: int, world_size: int) -> str:
    """The command-line fix for batches that need more domains than the data has."""
    k = cfg.samples_per_identity
    per_step = cfg.batch_size // k
    fits = _fitting_k(cfg.batch_size, available // world_size)
    hint = (
        f"use --samples-per-identity {fits} ({cfg.batch_size // fits} domains x {fits} "
        "images), or leave it out to have it chosen"
        if fits
        else "use fewer processes or a dataset with more domains"
    )
    return (
        f"the training data has {available} domains ({kind}), but --batch-size "
        f"{cfg.batch_size} / --samples-per-identity {k} = {per_step} "
        f"domains per step x {world_size} process(es) need {per_step * world_size}; {hint}"
    )


def _fitting_k(batch_size: int, max_domains: int) -> int | None:
    """Smallest K dividing ``batch_size`` with ``2 <= batch_size / K <= max_domains``."""
    for k in range(1, batch_size + 1):
        if batch_size % k == 0 and 2 <= batch_size // k <= max_domains:
            return k
    return None


def batch_layout(cfg: TrainConfig, kind: str, available: int, world_size: int = 1) -> BatchLayout:
    """The P x K layout of this run's batches.

    ``--samples-per-identity K`` given: ``batch_size / K`` domains per batch, or a
    ``ValueError`` naming the flags if the data has fewer domains than that (per
    process). Left out (``None``): :data:`elim.config.DEFAULT_SAMPLES_PER_IDENTITY`
    images per domain when enough domains exist, else the layout with the most domains
    that fits (five age groups of ``--domain age``: 5 x ``batch_size / 5``), with a note
    saying so. Data without domains (``kind == "image"``) gets ``K = 1``: plain random
    batches, which only the baseline can use.

    Example:
        >>> cfg = TrainConfig(batch_size=120)
        >>> batch_layout(cfg, "identity", 40)[:2]
        (10, 12)
        >>> batch_layout(cfg, "age_group", 5).note
        '5 domains (age_group) cannot fill the default 10 x 12 per batch: batches of 5 x 24 (--samples-per-identity 24)'
    """
    if kind == "image":
        return BatchLayout(cfg.batch_size, 1, None)
    per_process = available // world_size
    k = cfg.samples_per_identity
    if k is not None:
        if cfg.batch_size // k > per_process:
            raise ValueError(_too_few_domains(cfg, kind, available, world_size))
        return BatchLayout(cfg.batch_size // k, k, None)
    k = DEFAULT_SAMPLES_PER_IDENTITY
    if cfg.batch_size % k == 0 and cfg.batch_size // k <= per_process:
        return BatchLayout(cfg.batch_size // k, k, None)
    fits = _fitting_k(cfg.batch_size, per_process)
    if fits is None:
        raise ValueError(
            f"the training data has {available} domains ({kind}): too few for batches of "
            f"--batch-size {cfg.batch_size} on {world_size} process(es); use fewer "
            "processes or a dataset with more domains"
        )
    default = f"{cfg.batch_size // k} x {k}" if cfg.batch_size % k == 0 else f"K = {k}"
    note = (
        f"{per_process} domains ({kind}) cannot fill the default {default} per batch: "
        f"batches of {cfg.batch_size // fits} x {fits} (--samples-per-identity {fits})"
    )
    return BatchLayout(cfg.batch_size // fits, fits, note)


def make_sampler(dataset, cfg: TrainConfig, rank: int, world_size: int):
    """The P x K identity-aware sampler of ``dataset`` for this rank, and its layout.

    Returns:
        ``(sampler, layout)``: a :class:`DistributedIdentityBatchSampler` and the
        :class:`BatchLayout` of :func:`batch_layout`.
    """
    available = len(set(np.asarray(dataset.identities).tolist()))
    layout = batch_layout(cfg, dataset.domain_kind, available, world_size)
    sampler = DistributedIdentityBatchSampler(
        dataset.identities,
        layout.domains,
        layout.samples,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
    )
    return sampler, layout
