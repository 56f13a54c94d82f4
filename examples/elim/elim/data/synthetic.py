"""A procedurally rendered face dataset with identity-confounded labels (no download needed).

Why this dataset exists: ELIM's claim is that a regressor trained on video clips (few
identities, each covering a narrow part of valence-arousal space) learns identity
shortcuts, and that matching identities removes them. This generator builds exactly that
situation, with a known ground truth:

- **Expression geometry is the true signal** in both splits: mouth curvature follows
  valence, mouth and eye openness follow arousal, brows rise with arousal and furrow with
  negative valence. Each identity also has its own resting-face offset and
  expressiveness gain (the "ID shift" of the paper), and expressiveness drops mildly
  with age (the demographic shift of ELIM-Age).
- **Training identities are confounded**: like an AFEW-VA clip, each covers a small
  region of VA space around an identity centre, and its skin tone and background follow
  the centre's valence while its hair colour and lighting follow the centre's arousal.
- **Test identities are not**: their appearance is drawn independently of their labels,
  and each image's label is drawn afresh, so an identity shortcut does not transfer.
  Labels of both splits have the same marginal distribution.

Faces are drawn by :func:`elim.data.faces.render_face` (PIL, supersampled). The output
follows the layout of the authors' released code (see :mod:`elim.data.csv_dataset`)::

    root/metadata.json                       generator parameters (cache key)
    root/identities.json                     per-identity attributes, for analysis
    root/train/training.csv                  subDirectory_filePath,valence,arousal
    root/train/ages.csv                      identity,age
    root/train/id_000/000000.png ...
    root/val/validation.csv, root/val/ages.csv, root/val/id_048/...
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._cache import has_record, locked, write_record
from ._csvio import write_va_csv
from .faces import ACCESSORIES, HAIR_STYLES, FaceAppearance, Jitter, render_face

GENERATOR_VERSION = 1
"""Bump when rendering changes, so that cached datasets are regenerated."""

SPLITS = {"train": "training.csv", "val": "validation.csv"}
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Every parameter of the synthetic face generator (frozen: it is the cache key).

    Geometry lengths are fractions of the face's half-width unless stated otherwise.

    Attributes:
        seed: master seed; every image is a pure function of the config.
        image_size: output side length in pixels (images are square RGB).
        render_scale: internal supersampling factor (each output pixel averages
            ``render_scale**2`` samples).
        n_train_identities: identities in the training split.
        n_test_identities: identities in the evaluation split (disjoint from training).
        train_images_per_identity: images per training identity (AFEW-VA clips have ~50).
        test_images_per_identity: images per test identity.
        va_centre_range: identity centres are uniform in ``[-r, r]^2``.
        va_spread: standard deviation of a training image's label around its identity
            centre; test labels use the same centre distribution and spread but draw a
            fresh centre per image.
        confounding: in ``[0, 1]``; weight of the identity's VA centre in its appearance
            for training identities (0 makes training like test).
        confound_noise: standard deviation of the noise added to the confounded
            appearance factors (factors live in ``[0, 1]``).
        neutral_offset_std: standard deviation of an identity's resting-face offset, in
            label units (a resting face that looks like a mild expression).
        expressiveness_range: range of the identity's expression gain.
        age_expressiveness_drop: relative loss of expressiveness from age 18 to 84.
        age_range: inclusive range of identity ages (uniform integers).
        jitter_translate: std of the per-image translation, as a fraction of the image.
        jitter_scale: std of the per-image relative scale change.
        jitter_rotate_deg: std of the per-image rotation in degrees.
        jitter_brightness: std of the per-image relative brightness change.
        pixel_noise: std of the per-pixel Gaussian noise, in ``[0, 1]`` intensity units.
        light_strength: amplitude of the directional lighting gradient.
    """

    seed: int = 0
    image_size: int = 64
    render_scale: int = 4
    n_train_identities: int = 48
    n_test_identities: int = 16
    train_images_per_identity: int = 64
    test_images_per_identity: int = 48
    va_centre_range: float = 0.7
    va_spread: float = 0.15
    confounding: float = 1.0
    confound_noise: float = 0.08
    neutral_offset_std: float = 0.12
    expressiveness_range: tuple[float, float] = (0.75, 1.25)
    age_expressiveness_drop: float = 0.2
    age_range: tuple[int, int] = (18, 84)
    jitter_translate: float = 0.025
    jitter_scale: float = 0.04
    jitter_rotate_deg: float = 4.0
    jitter_brightness: float = 0.04
    pixel_noise: float = 0.015
    light_strength: float = 0.3

    def __post_init__(self) -> None:
        positive_ints = (
            "image_size",
            "render_scale",
            "n_train_identities",
            "n_test_identities",
            "train_images_per_identity",
            "test_images_per_identity",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be an integer >= 1, got {value!r}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        if not 0.0 <= self.confounding <= 1.0:
            raise ValueError(
                f"SyntheticConfig.confounding must be in [0, 1], got {self.confounding}"
            )
        if not 0.0 < self.va_centre_range <= 1.0:
            raise ValueError(
                f"SyntheticConfig.va_centre_range must be in (0, 1], got {self.va_centre_range}"
            )
        low, high = self.age_range
        if not 0 <= low <= high:
            raise ValueError(
                f"SyntheticConfig.age_range must satisfy 0 <= low <= high, got {self.age_range}"
            )
        for name in ("va_spread", "confound_noise", "neutral_offset_std", "pixel_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Identity:
    """One synthetic person: a name, a split, an appearance and (training only) a VA centre."""

    name: str
    split: str
    appearance: FaceAppearance
    va_centre: tuple[float, float] | None
    factors: tuple[float, float, float, float]


def _ramp(stops: list[tuple[int, int, int]], t: float) -> tuple[int, int, int]:
    """Piecewise-linear colour ramp through ``stops`` at ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    frac = t - i
    return tuple(round(a + (b - a) * frac) for a, b in zip(stops[i], stops[i + 1]))


def _mix(colour, other, weight: float) -> tuple[int, int, int]:
    return tuple(round(c + (o - c) * weight) for c, o in zip(colour, other))


_SKIN = [(250, 222, 196), (228, 180, 140), (190, 132, 90), (135, 86, 52), (82, 52, 32)]
_HAIR = [(226, 196, 120), (176, 104, 52), (104, 64, 36), (52, 36, 28), (18, 16, 16)]


def _appearance(rng: np.random.Generator, factors, age: int, config: SyntheticConfig):
    skin_t, background_t, hair_t, light_t = factors
    hue = (0.55 + 0.8 * background_t) % 1.0  # stays short of a full turn: hue -> factor is 1:1
    background = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.35, 0.8))
    grey = min(max((age - 35) / 50.0, 0.0), 0.8)
    # Always drawn, so that setting a std to 0 leaves every other attribute unchanged.
    offset = rng.normal(0.0, 1.0, size=2) * config.neutral_offset_std
    low, high = config.age_range
    age_t = (age - low) / max(high - low, 1)
    gain = rng.uniform(*config.expressiveness_range) * (
        1.0 - config.age_expressiveness_drop * age_t
    )
    return FaceAppearance(
        skin=_ramp(_SKIN, skin_t),
        hair=_mix(_ramp(_HAIR, hair_t), (205, 205, 205), grey),
        background=background,
        brightness=0.75 + 0.4 * light_t,
        light_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        face_scale=float(rng.uniform(0.9, 1.08)),
        face_aspect=float(rng.uniform(1.15, 1.4)),
        eye_spacing=float(rng.uniform(0.33, 0.45)),
        eye_size=float(rng.uniform(0.85, 1.15)),
        mouth_width=float(rng.uniform(0.35, 0.5)),
        iris=_ramp([(60, 40, 25), (70, 100, 60), (60, 90, 140)], float(rng.uniform())),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        accessory=ACCESSORIES[int(rng.integers(len(ACCESSORIES)))],
        accessory_colour=tuple(int(c) for c in rng.integers(20, 236, size=3)),
        age=age,
        neutral_offset=(float(offset[0]), float(offset[1])),
        expressiveness=float(gain),
    )


def sample_identities(config: SyntheticConfig) -> list[Identity]:
    """Draw every identity of both splits (training first), deterministically from the seed.

    Args:
        config: generator parameters.

    Returns:
        ``n_train_identities + n_test_identities`` identities named ``id_000, id_001, ...``;
        training identities carry their VA centre, test identities ``None``.

    Example:
        >>> ids = sample_identities(SyntheticConfig(n_train_identities=3, n_test_identities=2))
        >>> [(i.name, i.split) for i in ids][-1]
        ('id_004', 'val')
    """
    rng = np.random.default_rng([config.seed, 0xFACE])
    total = config.n_train_identities + config.n_test_identities
    width = max(3, len(str(total - 1)))
    identities = []
    for index in range(total):
        split = "train" if index < config.n_train_identities else "val"
        age = int(rng.integers(config.age_range[0], config.age_range[1] + 1))
        independent = rng.uniform(0.0, 1.0, size=4)
        centre = None
        factors = independent
        if split == "train":
            centre = rng.uniform(-config.va_centre_range, config.va_centre_range, size=2)
            # Map the centre to [0, 1] so that confounded factors keep the uniform
            # marginal of the independent ones: only the correlation differs between splits.
            driven = 0.5 + 0.5 * centre[[0, 0, 1, 1]] / config.va_centre_range
            driven = driven + rng.normal(0.0, config.confound_noise, size=4)
            factors = config.confounding * driven + (1.0 - config.confounding) * independent
            factors = np.clip(factors, 0.0, 1.0)
        appearance = _appearance(rng, [float(f) for f in factors], age, config)
        identities.append(
            Identity(
                name=f"id_{index:0{width}d}",
                split=split,
                appearance=appearance,
                va_centre=None if centre is None else (float(centre[0]), float(centre[1])),
                factors=tuple(float(f) for f in factors),
            )
        )
    return identities


def sample_labels(identity: Identity, count: int, config: SyntheticConfig) -> np.ndarray:
    """Valence-arousal labels ``(count, 2)`` of one identity, rounded to 6 decimals.

    Training identities stay near their centre (like a video clip); a test identity's
    images each get a fresh centre, so their labels span the whole VA space.
    """
    rng = np.random.default_rng([config.seed, 0x1AB, int(identity.name.split("_")[1])])
    r = config.va_centre_range
    if identity.va_centre is not None:
        centres = np.broadcast_to(np.asarray(identity.va_centre), (count, 2))
    else:
        centres = rng.uniform(-r, r, size=(count, 2))
    labels = np.clip(centres + rng.normal(0.0, config.va_spread, size=(count, 2)), -1.0, 1.0)
    # Rounded so that the CSV text is exactly the label the image was rendered from.
    return np.round(labels, 6)


def sample_jitter(rng: np.random.Generator, config: SyntheticConfig) -> Jitter:
    """Draw the per-image nuisance transform."""
    dx, dy = rng.normal(0.0, config.jitter_translate, size=2)
    return Jitter(
        dx=float(dx),
        dy=float(dy),
        scale=float(1.0 + rng.normal(0.0, config.jitter_scale)),
        rotate_deg=float(rng.normal(0.0, config.jitter_rotate_deg)),
        brightness=float(1.0 + rng.normal(0.0, config.jitter_brightness)),
    )


def _render_identity(job: tuple[Identity, SyntheticConfig, str]) -> list[tuple[str, float, float]]:
    """Render and save all images of one identity; returns its CSV rows."""
    identity, config, split_dir = job
    count = (
        config.train_images_per_identity
        if identity.split == "train"
        else config.test_images_per_identity
    )
    labels = sample_labels(identity, count, config)
    folder = Path(split_dir) / identity.name
    folder.mkdir(parents=True, exist_ok=True)
    index = int(identity.name.split("_")[1])
    rows = []
    for k, (valence, arousal) in enumerate(labels):
        # One generator per image: the result does not depend on worker scheduling.
        rng = np.random.default_rng([config.seed, _SPLIT_CODES[identity.split], index, k])
        pixels = render_face(
            identity.appearance,
            float(valence),
            float(arousal),
            image_size=config.image_size,
            render_scale=config.render_scale,
            jitter=sample_jitter(rng, config),
            noise=config.pixel_noise,
            light_strength=config.light_strength,
            rng=rng,
        )
        name = f"{k:06d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append((f"{identity.name}/{name}", float(valence), float(arousal)))
    return rows


def _metadata(config: SyntheticConfig) -> dict:
    return {
        "generator": "elim-synthetic-faces",
        "version": GENERATOR_VERSION,
        "config": dataclasses.asdict(config),
    }


def is_generated(root: str | Path, config: SyntheticConfig) -> bool:
    """Whether ``root`` holds a complete dataset generated with exactly ``config``."""
    root = Path(root)
    files = [root / split / csv_name for split, csv_name in SPLITS.items()]
    return has_record(root / "metadata.json", _metadata(config)) and all(p.is_file() for p in files)


def generate_synthetic(
    root: str | Path,
    config: SyntheticConfig | None = None,
    *,
    num_workers: int | None = None,
    force: bool = False,
) -> Path:
    """Generate the synthetic dataset under ``root`` unless it is already there.

    The dataset is regenerated only when ``root/metadata.json`` is missing or records
    different parameters (or ``force``). Generation holds a file lock on ``root``, so
    several processes (e.g. distributed ranks) may call this at once.

    Args:
        root: output folder (created if needed).
        config: generator parameters; default :class:`SyntheticConfig()`.
        num_workers: rendering processes; default ``min(4, os.cpu_count())``; ``0`` renders
            in this process.
        force: regenerate even if a matching dataset exists.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> cfg = SyntheticConfig(n_train_identities=2, n_test_identities=1,
        ...                       train_images_per_identity=2, test_images_per_identity=2)
        >>> out = generate_synthetic(tempfile.mkdtemp(), cfg, num_workers=0)
        >>> (out / "train" / "training.csv").read_text().splitlines()[0]
        'subDirectory_filePath,valence,arousal'
    """
    config = config or SyntheticConfig()
    root = Path(root)
    with locked(root):
        if not force and is_generated(root, config):
            return root
        (root / "metadata.json").unlink(missing_ok=True)
        staging = root / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        identities = sample_identities(config)
        jobs = [(identity, config, str(staging / identity.split)) for identity in identities]
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(_render_identity, jobs))
        else:
            results = [_render_identity(job) for job in jobs]
        for split, csv_name in SPLITS.items():
            members = [(i, rows) for i, rows in zip(identities, results) if i.split == split]
            write_va_csv(staging / split / csv_name, [row for _, rows in members for row in rows])
            with (staging / split / "ages.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["identity", "age"])
                writer.writerows((i.name, i.appearance.age) for i, _ in members)
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
            os.replace(staging / split, root / split)
        shutil.rmtree(staging, ignore_errors=True)
        summary = [
            {
                "name": i.name,
                "split": i.split,
                "va_centre": i.va_centre,
                "factors": dict(zip(("skin", "background", "hair", "light"), i.factors)),
                **dataclasses.asdict(i.appearance),
            }
            for i in identities
        ]
        (root / "identities.json").write_text(json.dumps(summary, indent=1))
        write_record(root / "metadata.json", _metadata(config))  # last: marks completion
    return root
