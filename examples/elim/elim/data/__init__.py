"""Data layer of the ELIM example: datasets, converters and identity-aware samplers.

Every dataset yields ``(image (3, H, W), label (2,) float in [-1, 1], domain int)``, the
image uint8 from :func:`make_transform` (the one image pipeline: the released resize,
then :func:`elim.data.base.augment` and :func:`elim.data.base.normalize` per batch),
and exposes ``identities`` (``(N,)`` int64 domain ids), ``identity_names``, ``labels``
(``(N, 2)``), ``ages`` (``(N,)`` or ``None``) and ``domain_kind``. Use
:func:`build_datasets` to get a train/eval pair for any source.
"""

from __future__ import annotations

from pathlib import Path

from .afew_va import convert_afew_va, read_clip
from .affectnet import AffectNetDataset, affectnet_image_dir
from .base import DOMAIN_KINDS, IMAGENET_MEAN, IMAGENET_STD, VADataset, make_transform
from .csv_dataset import VACsvDataset, read_ages
from .sampler import (
    AGE_GROUP_EDGES,
    AGE_GROUP_NAMES,
    DistributedIdentityBatchSampler,
    IdentityBatchSampler,
    age_group,
)
from .synthetic import SyntheticConfig, generate_synthetic, render_face, sample_identities

__all__ = [
    "AGE_GROUP_EDGES",
    "AGE_GROUP_NAMES",
    "DATA_KINDS",
    "DOMAIN_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AffectNetDataset",
    "DistributedIdentityBatchSampler",
    "IdentityBatchSampler",
    "SyntheticConfig",
    "VACsvDataset",
    "VADataset",
    "affectnet_image_dir",
    "age_group",
    "build_datasets",
    "convert_afew_va",
    "generate_synthetic",
    "make_transform",
    "read_ages",
    "read_clip",
    "render_face",
    "sample_identities",
]

DATA_KINDS = ("synthetic", "csv", "afew-va", "affectnet")


def build_datasets(
    kind: str,
    root: str | Path,
    image_size: int = 64,
    *,
    domain: str = "auto",
    age_file: str | Path | None = None,
    synthetic_config: SyntheticConfig | None = None,
    num_workers: int | None = None,
    converted_root: str | Path | None = None,
    identity: str = "clip",
    val_fraction: float = 0.2,
    seed: int = 0,
    crop_face: bool = False,
    train_transform=None,
    eval_transform=None,
) -> tuple[VADataset, VADataset]:
    """Build the ``(train, eval)`` datasets of one data source, with the uniform interface.

    Args:
        kind: ``"synthetic"`` (generated into ``root`` on first use), ``"csv"`` (``root``
            in the released code's layout), ``"afew-va"`` (``root`` = raw AFEW-VA,
            converted into ``converted_root``) or ``"affectnet"`` (``root`` holds
            ``training.csv``, ``validation.csv`` and the images).
        root: data folder, see ``kind``.
        image_size: side of the network input; images are resized with
            :func:`make_transform` (train: ``round(S * 256/224)`` square, for the random
            crop of :func:`elim.data.base.augment`; eval: the centre ``S x S`` crop).
        domain: what ``identities`` holds: ``"identity"``, ``"age"`` (ELIM-Age: 5 age
            groups; needs ages), ``"image"`` (AffectNet only) or ``"auto"`` (identity
            where the source has identities, else age group if ages are given, else image).
        age_file: ages for ``csv`` (``identity,age`` or ``subDirectory_filePath,age``; by
            default ``{root}/{split}/ages.csv`` when present) or ``affectnet``
            (``subDirectory_filePath,age``, one file for both splits).
        synthetic_config: generator parameters for ``synthetic``.
        num_workers: rendering processes for ``synthetic``.
        converted_root: output of the AFEW-VA conversion; default
            ``<root>_elim_csv`` beside ``root``.
        identity: AFEW-VA identity, ``"clip"`` or ``"actor"``.
        val_fraction: AFEW-VA fraction of identities held out.
        seed: AFEW-VA split seed.
        crop_face: AffectNet: crop to the annotated face box.
        train_transform: override the training transform.
        eval_transform: override the evaluation transform.

    Returns:
        ``(train_dataset, eval_dataset)``.

    Example:
        >>> import tempfile
        >>> cfg = SyntheticConfig(n_train_identities=2, n_test_identities=2,
        ...                       train_images_per_identity=3, test_images_per_identity=3)
        >>> train, test = build_datasets("synthetic", tempfile.mkdtemp(), 32,
        ...                              synthetic_config=cfg, num_workers=0)
        >>> len(train), train.labels.shape, train[0][0].shape, train.domain_kind
        (6, torch.Size([6, 2]), torch.Size([3, 37, 37]), 'identity')
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"`kind` must be one of {DATA_KINDS}, got {kind!r}")
    if domain not in ("auto", "identity", "age", "image"):
        raise ValueError(f"`domain` must be 'auto', 'identity', 'age' or 'image', got {domain!r}")
    root = Path(root)
    train_transform = train_transform or make_transform(image_size, train=True)
    eval_transform = eval_transform or make_transform(image_size, train=False)
    if kind == "affectnet":
        image_dir = affectnet_image_dir(root)
        pair = [
            AffectNetDataset(
                root / csv_name,
                image_dir,
                transform=transform,
                age_file=age_file,
                domain=domain,
                crop_face=crop_face,
            )
            for csv_name, transform in (
                ("training.csv", train_transform),
                ("validation.csv", eval_transform),
            )
        ]
        return pair[0], pair[1]
    if domain == "image":
        raise ValueError(f"`domain`='image' is only for kind 'affectnet', got kind {kind!r}")
    if kind == "synthetic":
        generate_synthetic(root, synthetic_config, num_workers=num_workers)
    elif kind == "afew-va":
        converted = (
            Path(converted_root) if converted_root else root.with_name(root.name + "_elim_csv")
        )
        root = convert_afew_va(
            root, converted, identity=identity, val_fraction=val_fraction, seed=seed
        )
    csv_domain = "identity" if domain == "auto" else domain
    return (
        VACsvDataset.from_root(
            root, "train", transform=train_transform, age_file=age_file, domain=csv_domain
        ),
        VACsvDataset.from_root(
            root, "val", transform=eval_transform, age_file=age_file, domain=csv_domain
        ),
    )
