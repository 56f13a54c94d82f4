"""The uniform dataset interface shared by every ELIM data source, and the image pipeline.

The pipeline has one deterministic half, :func:`make_transform` (decode, resize,
centre-crop; uint8), applied per image by every dataset, and one random half,
:func:`augment` (random crop, flip) then :func:`normalize`, applied per batch on the
device. Each dataset yields ``(image, label, domain)`` with ``image`` a ``(3, H, W)``
tensor (uint8 with :func:`make_transform`, float without a transform), ``label`` a ``(2,)`` float tensor ``(valence, arousal)`` in ``[-1, 1]`` and
``domain`` an ``int``, and exposes the per-sample arrays the samplers and the matching
need without touching any image: ``identities``, ``identity_names``, ``labels``, ``ages``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DOMAIN_KINDS = ("identity", "age_group", "image")
"""What ``dataset.identities`` holds: a person/clip id, an age group, or one id per image
(a source without identity labels, e.g. AffectNet without ages)."""


RESIZE_RATIO = 256 / 224
"""Resize-to-crop ratio of the released pipeline (resize 256, crop 224)."""


def make_transform(image_size: int, *, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The deterministic half of the released image pipeline, scaled to ``image_size``.

    Resize the short side to ``R = round(image_size * 256/224)`` and centre-crop: to
    ``R x R`` for training (the random ``image_size`` crop and the flip are applied per
    batch by :func:`augment`, from an explicit generator) and to ``image_size`` for
    evaluation. Images stay uint8 (4x less memory when cached); :func:`normalize` scales
    and ImageNet-normalises them on the device. This is the only image pipeline: every
    data source, the cache and the DataLoader path go through it, so a cached and a
    streamed run see the same pixels.

    Args:
        image_size: network input side.
        train: keep the ``R x R`` resize for random cropping, else centre-crop.

    Returns:
        A callable mapping a PIL image to a ``(3, R, R)`` or ``(3, S, S)`` uint8 tensor.

    Example:
        >>> from PIL import Image
        >>> make_transform(32, train=True)(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 37, 37])
        >>> make_transform(32, train=False)(Image.new("RGB", (50, 40))).dtype
        torch.uint8
    """
    from torchvision.transforms import v2  # deferred: importing torchvision takes seconds

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"`image_size` must be an integer >= 1, got {image_size!r}")
    side = round(image_size * RESIZE_RATIO)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(side, antialias=True),
            v2.CenterCrop(side if train else image_size),
            v2.ToPureTensor(),
        ]
    )


def to_tensor_transform() -> Callable[[Image.Image], torch.Tensor]:
    """PIL image to a ``(3, H, W)`` float tensor in ``[0, 1]``, without resizing."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class VADataset(Dataset):
    """Images with valence-arousal labels and a domain id per sample (the uniform interface).

    Subclasses parse their source format and call this constructor; errors while
    loading an image name the file and the source row.

    Attributes:
        paths: ``N`` image paths.
        labels: ``(N, 2)`` float32 tensor, valence and arousal in ``[-1, 1]``.
        identities: ``(N,)`` int64 tensor, the domain id of each sample.
        identity_names: name of each domain id (``identity_names[identities[i]]``).
        domain_kind: one of :data:`DOMAIN_KINDS`.
        ages: ``(N,)`` int64 tensor of ages in years, or ``None``.
        transform: callable applied to the PIL image.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        identities: np.ndarray,
        identity_names: Sequence[str],
        *,
        domain_kind: str,
        ages: np.ndarray | None,
        transform: Callable[[Image.Image], torch.Tensor] | None,
        source: Path,
        rows: np.ndarray,
        crop_boxes: np.ndarray | None = None,
    ) -> None:
        if domain_kind not in DOMAIN_KINDS:
            raise ValueError(f"`domain_kind` must be one of {DOMAIN_KINDS}, got {domain_kind!r}")
        if len(paths) == 0:
            raise ValueError(f"{source}: no samples")
        self.paths = list(paths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32).reshape(-1, 2))
        self.identities = torch.as_tensor(np.asarray(identities, dtype=np.int64))
        self.identity_names = list(identity_names)
        self.domain_kind = domain_kind
        self.ages = None if ages is None else torch.as_tensor(np.asarray(ages, dtype=np.int64))
        self.transform = transform if transform is not None else to_tensor_transform()
        self.source = source
        self._rows = np.asarray(rows, dtype=np.int64)  # (N, 2): data row and file line
        self._crop_boxes = crop_boxes  # (N, 4) left, top, right, bottom, or None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int], transform=None) -> VADataset:
        """A dataset of the samples ``indices`` (same domain ids and names).

        Args:
            indices: positions to keep, in order.
            transform: the subset's transform; default this dataset's.
        """
        part = copy.copy(self)
        idx = np.asarray(indices, dtype=np.int64)
        part.paths = [self.paths[i] for i in idx]
        part.labels = self.labels[idx]
        part.identities = self.identities[idx]
        part.ages = None if self.ages is None else self.ages[idx]
        part._rows = self._rows[idx]
        part._crop_boxes = None if self._crop_boxes is None else self._crop_boxes[idx]
        if transform is not None:
            part.transform = transform
        return part

    def location(self, index: int) -> str:
        """``'<source file>, row <n> (line <m>)'`` of sample ``index``, for messages."""
        row, line = self._rows[index]
        return f"{self.source}, row {row} (line {line})"

    def load_image(self, index: int) -> Image.Image:
        """The untransformed RGB image of sample ``index`` (cropped if boxes are set)."""
        path = self.paths[index]
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.location(index)}: cannot read image {path}: {error}"
            ) from error
        if self._crop_boxes is not None:
            image = image.crop(tuple(int(c) for c in self._crop_boxes[index]))
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.transform(self.load_image(index))
        return image, self.labels[index], int(self.identities[index])


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
