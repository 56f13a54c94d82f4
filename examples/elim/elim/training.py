"""The pieces of ``train.py``: model, optimisers, data pipeline, one training step, evaluation.

``train.py`` reads top to bottom as the training recipe; the functions here hold the
details so that each can be tested on its own.

One ELIM iteration (reference §2, ``update="two-step"``, the released code):

1. main step: ``z = f_phi(x)``, ``L = MSE_v + MSE_a + 0.5 (L_PCC + L_CCC)`` on
   ``f_theta(z)``; backward; step both optimisers.
2. ELIM step (once the warm-up ramp is above 0): recompute ``z = f_phi(x)`` with the
   updated encoder; group by identity, Gumbel top-k, one batched Sinkhorn call for every
   (reference, target) pair, shift and RMS-normalise the targets; ELIM loss; backward;
   clip the encoder's gradient norm; step both optimisers.

``update="combined"`` computes ``z`` once, adds both losses and takes one optimiser
step (half the compute; not what the authors ran).

Data: datasets are built with *deterministic* transforms (resize, then a square centre
crop of side ``round(S * 256/224)``, kept as uint8), and the random part of the
released augmentation (random ``S x S`` crop, horizontal flip) is applied per batch by
:func:`augment` from an explicit generator. Augmentation is therefore independent of
DataLoader workers, decoded images can be cached in memory, and a resumed run draws
exactly the batches that an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attention import ELIMAttention
from .config import MATCHING_METHODS, TrainConfig
from .data import (
    AGE_GROUP_EDGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DistributedIdentityBatchSampler,
    build_datasets,
)
from .data.synthetic import SyntheticConfig
from .losses import elim_loss, regression_loss, warmup_ramp
from .matching import MatchingConfig, elim_matching_step
from .metrics import va_metrics
from .models import Projector, build_encoder

__all__ = [
    "RESIZE_RATIO",
    "Batches",
    "ELIMModel",
    "Optimizers",
    "augment",
    "build_datasets_for",
    "build_model",
    "build_optimizers",
    "check_age_domain",
    "check_ot_grad",
    "default_data_root",
    "evaluate",
    "frozen_bn_stats",
    "identity_share",
    "make_sampler",
    "matching_config",
    "normalize",
    "preload",
    "read_jsonl",
    "train_step",
    "truncate_jsonl",
]

RESIZE_RATIO = 256 / 224
"""Resize-to-crop ratio of the released pipeline (resize 256, crop 224)."""

EXAMPLE_DIR = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ model


class ELIMModel(nn.Module):
    """Encoder ``f_phi``, projector ``f_theta`` and, for ELIM-Attention, the attention
    module in one module (one DDP wrapper, one ``state_dict`` for checkpoints).

    Args:
        encoder: images ``(B, 3, S, S)`` -> features ``(B, D)``.
        projector: features ``(B, D)`` -> valence/arousal ``(B, 2)``.
        attention: an :class:`elim.attention.ELIMAttention` (``--method
            elim-attention``) or ``None``; it is used only by the ELIM step, never by
            :meth:`forward`.

    Example:
        >>> m = ELIMModel(torch.nn.Linear(3, 4), Projector(4)).eval()
        >>> z, y = m(torch.randn(5, 3))
        >>> z.shape, y.shape, m(torch.randn(5, 3), project=False)[1]
        (torch.Size([5, 4]), torch.Size([5, 2]), None)
    """

    def __init__(
        self, encoder: nn.Module, projector: nn.Module, attention: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.attention = attention

    def forward(
        self, images: torch.Tensor, project: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and, unless ``project=False``, predictions ``(B, 2)``.

        ``project=False`` serves the ELIM step, which feeds the projector matched
        features instead; skipping it keeps the projector's BatchNorm statistics from
        seeing the same batch twice.
        """
        z = self.encoder(images)
        return z, (self.projector(z) if project else None)


def build_model(cfg: TrainConfig) -> ELIMModel:
    """Encoder of ``cfg.backbone`` (``cfg.pretrained`` loaded if given) + projector, and
    ``ELIMAttention(cfg.feature_dim, cfg.attention_heads)`` for ``--method elim-attention``.

    The attention module is built *after* encoder and projector, so that with the same
    seed every method starts from the same encoder and projector weights.

    Example:
        >>> cfg = TrainConfig(method="elim-attention", backbone="resnet18", feature_dim=16)
        >>> m = build_model(cfg)
        >>> type(m.attention).__name__, build_model(TrainConfig(feature_dim=16)).attention
        ('ELIMAttention', None)
    """
    encoder = build_encoder(
        cfg.backbone, cfg.feature_dim, image_size=cfg.image_size, pretrained_path=cfg.pretrained
    )
    projector = Projector(cfg.feature_dim)
    attention = None
    if cfg.method == "elim-attention":
        attention = ELIMAttention(cfg.feature_dim, num_heads=cfg.attention_heads)
    return ELIMModel(encoder, projector, attention)


@dataclass
class Optimizers:
    """The released code's separate Adam optimisers (and MultiStepLR schedulers).

    Attributes:
        encoder: optimiser of ``f_phi`` (lr ``cfg.lr``).
        projector: optimiser of ``f_theta`` (lr ``cfg.lr * cfg.projector_lr_mult``).
        schedulers: one MultiStepLR per optimiser, stepped once per iteration.
        attention: optimiser of the ELIM-Attention module (lr ``cfg.lr *
            cfg.attention_lr_mult``), or ``None`` for the other methods.
    """

    encoder: torch.optim.Optimizer
    projector: torch.optim.Optimizer
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    attention: torch.optim.Optimizer | None = None

    def named(self) -> dict[str, torch.optim.Optimizer]:
        """``{"encoder": ..., "projector": ...}`` (+ ``"attention"`` when present)."""
        named = {"encoder": self.encoder, "projector": self.projector}
        if self.attention is not None:
            named["attention"] = self.attention
        return named

    def zero_grad(self) -> None:
        """Clear the gradients of every optimised parameter."""
        for opt in self.named().values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimiser step of every optimiser."""
        for opt in self.named().values():
            opt.step()

    def state_dict(self) -> dict:
        """Optimiser and scheduler states, for checkpoints."""
        return {
            "optimizers": {k: o.state_dict() for k, o in self.named().items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        for k, o in self.named().items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])


def build_optimizers(model: ELIMModel, cfg: TrainConfig) -> Optimizers:
    """Adam(betas) for encoder and projector; the projector's lr is ``projector_lr_mult x lr``.

    A model with an attention module (ELIM-Attention) gets a third Adam for it, lr
    ``attention_lr_mult x lr`` (default: the encoder's lr; the appendix gives none, and
    the module starts from random weights like the encoder, whereas the released
    code's reduced projector lr is meant for a head on top of pretrained features).
    """
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    enc = torch.optim.Adam(
        model.encoder.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay
    )
    proj = torch.optim.Adam(
        model.projector.parameters(),
        lr=cfg.lr * cfg.projector_lr_mult,
        betas=betas,
        weight_decay=cfg.weight_decay,
    )
    named = [("encoder", enc), ("projector", proj)]
    att = None
    if getattr(model, "attention", None) is not None:
        att = torch.optim.Adam(
            model.attention.parameters(),
            lr=cfg.lr * cfg.attention_lr_mult,
            betas=betas,
            weight_decay=cfg.weight_decay,
        )
        named.append(("attention", att))
    milestones = sorted(int(m) for m in cfg.milestones)
    schedulers = {
        name: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg.gamma)
        for name, opt in named
    }
    return Optimizers(enc, proj, schedulers, att)


# ------------------------------------------------------------------------------ matching


def check_ot_grad(mode: str) -> None:
    """Fail early, with a clear message, if the solver does not offer gradient ``mode``.

    ``"implicit"`` only exists once :func:`sinkhorn_ot.sinkhorn` implements it; probing
    a 2 x 2 problem costs microseconds and avoids crashing at the first ELIM step.
    """
    if mode == "none":
        return
    import sinkhorn_ot

    try:
        sinkhorn_ot.sinkhorn(
            torch.rand(1, 2, 2), eps=0.5, max_iter=2, tol=None, grad=mode, backend="torch"
        )
    except (NotImplementedError, ValueError) as error:
        raise ValueError(
            f"`ot_grad`={mode!r} is not supported by this sinkhorn_ot ({error}); "
            "use --ot-grad none (the released code's detached shift) or unroll"
        ) from error


def matching_config(cfg: TrainConfig) -> MatchingConfig:
    """The :class:`MatchingConfig` of a training config.

    ``--ot-grad none`` keeps the released code's detached shift; any other mode
    computes the shift from the live features and differentiates through the solver.
    """
    base = MatchingConfig.paper() if cfg.sinkhorn == "paper" else MatchingConfig.converged()
    return MatchingConfig(
        num_domains=cfg.num_domains,
        top_k=cfg.top_k or None,
        gumbel_temperature=cfg.gumbel_temperature,
        eps=cfg.ot_eps,
        method=base.method,
        max_iter=cfg.ot_iters or base.max_iter,
        tol=None if cfg.sinkhorn == "paper" else cfg.ot_tol,
        grad=cfg.ot_grad,
        shift=cfg.shift,
        mass=cfg.mass,
        detach_shift=cfg.ot_grad == "none",
        backend=cfg.ot_backend,
    )


# ------------------------------------------------------------------------------ data


def default_data_root(kind: str) -> Path:
    """``examples/elim/data_cache/synthetic`` for synthetic data (git-ignored)."""
    if kind != "synthetic":
        raise ValueError(f"--data {kind} needs --data-root (the dataset folder)")
    return EXAMPLE_DIR / "data_cache" / "synthetic"


def _transforms(image_size: int):
    from torchvision.transforms import v2

    side = round(image_size * RESIZE_RATIO)
    # uint8 output: 4x less memory when cached, and normalisation happens on the device.
    train = v2.Compose(
        [v2.ToImage(), v2.Resize(side, antialias=True), v2.CenterCrop(side), v2.ToPureTensor()]
    )
    evaluation = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(side, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToPureTensor(),
        ]
    )
    return train, evaluation


def build_datasets_for(cfg: TrainConfig, data_root: str | Path):
    """Train and held-out datasets of ``cfg.data`` with the deterministic uint8 transforms.

    Training images come out as ``(3, R, R)`` uint8 with ``R = round(S * 256/224)`` (the
    released pipeline's resize; non-square images are centre-cropped to a square);
    evaluation images as ``(3, S, S)`` uint8, the released centre crop.
    """
    train_tf, eval_tf = _transforms(cfg.image_size)
    synthetic = SyntheticConfig(**cfg.synthetic_overrides) if cfg.synthetic_overrides else None
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


def augment(images: torch.Tensor, size: int, generator: torch.Generator, flip: bool = True):
    """Random ``size x size`` crop and horizontal flip of each image of a batch.

    Args:
        images: ``(B, C, H, W)``, any dtype, ``H, W >= size``.
        size: crop side.
        generator: CPU generator: the only source of randomness, so the result is a
            pure function of its state.
        flip: flip each image with probability 1/2 (valence and arousal are
            mirror-invariant).

    Returns:
        ``(B, C, size, size)``, same dtype and device as ``images``.

    Example:
        >>> x = torch.arange(2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
        >>> augment(x, 2, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 2, 2])
    """
    b, c, h, w = images.shape
    if h < size or w < size:
        raise ValueError(f"`images` of size {h}x{w} cannot be cropped to {size}x{size}")
    top = torch.randint(0, h - size + 1, (b,), generator=generator)
    left = torch.randint(0, w - size + 1, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    dev = images.device
    span = torch.arange(size, device=dev)
    rows = (top.to(dev)[:, None] + span)[:, None, :, None]  # (B, 1, S, 1)
    cols = (left.to(dev)[:, None] + span)[:, None, None, :]  # (B, 1, 1, S)
    cols = torch.where(flips.to(dev)[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return images[batch, chan, rows, cols]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# ------------------------------------------------------------------------------ training


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Keep the BatchNorm running statistics of ``module`` unchanged inside the block.

    The layers still normalise with the statistics of the current batch (train mode);
    only the running averages used at evaluation are left alone (momentum 0).

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_bn_stats(bn):
        ...     _ = bn(torch.randn(8, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    if enabled:
        for m in layers:
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


def _elim_loss(model: ELIMModel, z, labels, domains, step, cfg, match_cfg, generator):
    """ELIM loss of one batch and its diagnostics; ``None`` if there is nothing to match.

    The projector runs on shifted, RMS-normalised target features here; with
    ``cfg.elim_bn_stats="freeze"`` they do not enter its BatchNorm running statistics,
    which evaluation applies to raw features. (In the released code they did: 9 of the
    10 projector calls per iteration were ELIM calls, so the running statistics ended
    up describing normalised features; see RESULTS.md.)
    """
    ramp = warmup_ramp(step, cfg.ramp_start, cfg.ramp_end)
    # ELIM-Attention: the module's weights replace the OT shift, for all targets at once.
    attention = model.attention if cfg.method == "elim-attention" else None
    matched = elim_matching_step(z, labels, domains, match_cfg, generator, attention=attention)
    if matched is None:
        return None, {"n_domains": 0.0, "shift_mean": 0.0}
    with frozen_bn_stats(model.projector, cfg.elim_bn_stats == "freeze"):
        loss = elim_loss(
            model.projector,
            matched.features,
            matched.labels,
            matched.mask,
            ramp=ramp,
            weight=cfg.elim_weight,
            per_domain=cfg.per_domain_projector,
        )
    target_mask = matched.mask[1:]
    stats = {
        "n_domains": float(matched.mask.shape[0]),
        "shift_mean": matched.shift[target_mask].mean().item(),
    }
    return loss, stats


def _touch_all(module: nn.Module) -> torch.Tensor:
    """A zero that depends on every parameter: keeps DDP's gradient buckets complete
    when one rank has nothing to match while the others do."""
    return sum(p.sum() for p in module.parameters()) * 0.0


def train_step(
    model: nn.Module,
    optimizers: Optimizers,
    images: torch.Tensor,
    labels: torch.Tensor,
    domains: torch.Tensor,
    step: int,
    cfg: TrainConfig,
    match_cfg: MatchingConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """One training iteration (see the module docstring); returns its log record.

    Args:
        model: the :class:`ELIMModel`, possibly wrapped in DDP.
        optimizers: encoder and projector optimisers.
        images: normalised, augmented batch ``(B, 3, S, S)`` on the device.
        labels: ``(B, 2)`` on the device.
        domains: ``(B,)`` identity (or age-group) ids, on the CPU.
        step: 0-based iteration, for the warm-up ramp.
        cfg: training settings (method, update, clip).
        match_cfg: matching settings.
        generator: CPU generator of the domain draw and Gumbel noise.

    Returns:
        ``loss_main``, ``loss_elim`` (weighted, as optimised; 0 for the baseline and
        during warm-up), ``ramp`` and, for ELIM steps, ``shift_mean``, ``n_domains``
        and ``grad_norm`` (encoder, before clipping).
    """
    core: ELIMModel = getattr(model, "module", model)
    use_elim = (
        cfg.method in MATCHING_METHODS and warmup_ramp(step, cfg.ramp_start, cfg.ramp_end) > 0
    )
    record = {"loss_main": 0.0, "loss_elim": 0.0, "ramp": 0.0}
    if use_elim:
        record["ramp"] = warmup_ramp(step, cfg.ramp_start, cfg.ramp_end)
    model.train()

    z, pred = model(images)
    loss_main = regression_loss(pred, labels)
    record["loss_main"] = loss_main.item()
    if not use_elim or cfg.update == "combined":
        loss = loss_main
        if use_elim:
            loss_e, stats = _elim_loss(core, z, labels, domains, step, cfg, match_cfg, generator)
            loss = loss + (loss_e if loss_e is not None else _touch_all(core))
            record.update(stats, loss_elim=loss_e.item() if loss_e is not None else 0.0)
        optimizers.zero_grad()
        loss.backward()
        if use_elim:
            record["grad_norm"] = _clip(core, cfg.clip_grad)
        optimizers.step()
        return record

    # Two-step update (released code): main step, then an ELIM step on fresh features.
    optimizers.zero_grad()
    loss_main.backward()
    optimizers.step()
    z, _ = model(images, project=False)
    loss_e, stats = _elim_loss(core, z, labels, domains, step, cfg, match_cfg, generator)
    optimizers.zero_grad()
    (loss_e if loss_e is not None else _touch_all(core)).backward()
    record["grad_norm"] = _clip(core, cfg.clip_grad)
    optimizers.step()
    record.update(stats, loss_elim=loss_e.item() if loss_e is not None else 0.0)
    return record


def _clip(core: ELIMModel, max_norm: float) -> float:
    """Clip the encoder's gradient norm (0 = only measure it); return the norm before."""
    params = [p for p in core.encoder.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)


# ------------------------------------------------------------------------------ evaluation


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
        model: the (possibly DDP-wrapped) :class:`ELIMModel`.
        dataset: evaluation dataset (centre-cropped uint8 images).
        indices: which samples (this rank's shard).
        images: cached ``(N, 3, S, S)`` uint8 images or ``None`` (DataLoader).
        device: where to run.
        batch_size: evaluation batch size.
        workers: DataLoader workers when not cached.
    """
    core: ELIMModel = getattr(model, "module", model)
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


# ------------------------------------------------------------------------------ logs


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file (``[]`` if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Drop records with ``step > max_step``: a resumed run rewrites what came after
    its checkpoint, so the log never holds two versions of a step."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _too_few_domains(cfg: TrainConfig, kind: str, available: int, world_size: int) -> str:
    """The command-line fix for batches that need more domains than the data has."""
    per_step = cfg.batch_size // cfg.samples_per_identity
    fits = [
        k
        for k in range(1, cfg.batch_size + 1)
        if cfg.batch_size % k == 0 and 2 <= cfg.batch_size // k <= available // world_size
    ]
    hint = (
        f"use --samples-per-identity {fits[0]} ({cfg.batch_size // fits[0]} domains x "
        f"{fits[0]} images)"
        if fits
        else "use fewer processes or a dataset with more domains"
    )
    return (
        f"the training data has {available} domains ({kind}), but --batch-size "
        f"{cfg.batch_size} / --samples-per-identity {cfg.samples_per_identity} = {per_step} "
        f"domains per step x {world_size} process(es) need {per_step * world_size}; {hint}"
    )


def make_sampler(dataset, cfg: TrainConfig, rank: int, world_size: int):
    """The P x K identity-aware sampler of ``dataset`` for this rank.

    A source without identities (``domain_kind == "image"``, e.g. AffectNet without
    ages) gets ``K = 1``: plain random batches, which only the baseline can use.
    """
    k = cfg.samples_per_identity if dataset.domain_kind != "image" else 1
    available = len(set(np.asarray(dataset.identities).tolist()))
    if dataset.domain_kind != "image" and (cfg.batch_size // k) * world_size > available:
        raise ValueError(_too_few_domains(cfg, dataset.domain_kind, available, world_size))
    return DistributedIdentityBatchSampler(
        dataset.identities,
        cfg.batch_size // k,
        k,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
    )
