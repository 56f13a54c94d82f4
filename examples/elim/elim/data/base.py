"""The uniform dataset interface shared by every ELIM data source, and its transforms.

Each dataset yields ``(image, label, domain)`` with ``image`` a ``(3, H, W)`` float
tensor, ``label`` a ``(2,)`` float tensor ``(valence, arousal)`` in ``[-1, 1]`` and
``domain`` an ``int``, and exposes the per-sample arrays the samplers and the matching
need without touching any image: ``identities``, ``identity_names``, ``labels``, ``ages``.
"""

from __future__ import annotations

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


def make_transform(
    image_size: int,
    *,
    train: bool,
    resize_ratio: float = 256 / 224,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    flip: bool = True,
) -> Callable[[Image.Image], torch.Tensor]:
    """Image pipeline of the released code, scaled to ``image_size``.

    Training: resize the short side to ``round(image_size * resize_ratio)`` (256 for 224),
    random crop ``image_size``, random horizontal flip (valence and arousal are
    mirror-invariant), scale to ``[0, 1]`` and normalise. Evaluation: the same resize and
    a centre crop.

    Args:
        image_size: output side length.
        train: random crop and flip when true, centre crop when false.
        resize_ratio: resize-to-crop ratio, ``>= 1``.
        mean: per-channel normalisation mean; ``None`` skips normalisation.
        std: per-channel normalisation std.
        flip: enable the random horizontal flip in training.

    Returns:
        A callable mapping a PIL image to a ``(3, image_size, image_size)`` float tensor.

    Example:
        >>> from PIL import Image
        >>> t = make_transform(32, train=True)
        >>> t(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    from torchvision.transforms import v2  # deferred: importing torchvision takes seconds

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"`image_size` must be an integer >= 1, got {image_size!r}")
    if resize_ratio < 1:
        raise ValueError(f"`resize_ratio` must be >= 1, got {resize_ratio}")
    steps: list[Callable] = [
        v2.ToImage(),
        v2.Resize(round(image_size * resize_ratio), antialias=True),
    ]
    if train:
        steps.append(v2.RandomCrop(image_size))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(v2.CenterCrop(image_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None:
        steps.append(v2.Normalize(list(mean), list(std if std is not None else (1.0, 1.0, 1.0))))
    return v2.Compose(steps)


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
