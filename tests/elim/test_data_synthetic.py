"""The procedurally rendered face dataset: determinism, caching, splits, confounding, geometry."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from elim.data import (
    SyntheticConfig,
    build_datasets,
    generate_synthetic,
    render_face,
    sample_identities,
)
from elim.data.faces import Jitter
from PIL import Image

TINY = SyntheticConfig(
    image_size=24,
    render_scale=2,
    n_train_identities=3,
    n_test_identities=2,
    train_images_per_identity=3,
    test_images_per_identity=2,
)
# Enough identities for correlations to mean something, small enough to render in ~1 s.
PROBE = SyntheticConfig(
    image_size=32,
    render_scale=2,
    n_train_identities=30,
    n_test_identities=30,
    train_images_per_identity=5,
    test_images_per_identity=5,
)


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("probe"), PROBE, num_workers=0)


def _files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _read(root, split):
    name = "training.csv" if split == "train" else "validation.csv"
    with (root / split / name).open() as handle:
        return list(csv.DictReader(handle))


def test_layout_matches_the_released_code(tmp_path):
    root = generate_synthetic(tmp_path, TINY, num_workers=0)
    rows = _read(root, "train")
    assert list(rows[0]) == ["subDirectory_filePath", "valence", "arousal"]
    assert len(rows) == 9 and len(_read(root, "val")) == 4
    assert rows[4]["subDirectory_filePath"] == "id_001/000001.png"
    image = Image.open(root / "train" / rows[4]["subDirectory_filePath"])
    assert image.size == (24, 24) and image.mode == "RGB"
    ages = list(csv.DictReader((root / "val" / "ages.csv").open()))
    assert [r["identity"] for r in ages] == ["id_003", "id_004"]
    assert all(18 <= int(r["age"]) <= 84 for r in ages)
    assert json.loads((root / "metadata.json").read_text())["config"]["seed"] == 0


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = _files(generate_synthetic(tmp_path / "a", TINY, num_workers=0))
    second = _files(generate_synthetic(tmp_path / "b", TINY, num_workers=2))
    assert first.keys() == second.keys() and len(first) > 10
    assert first == second, "rendering must not depend on the seed path or worker count"
    other = _files(
        generate_synthetic(tmp_path / "c", dataclasses.replace(TINY, seed=1), num_workers=0)
    )
    assert other["train/training.csv"] != first["train/training.csv"]
    assert other["train/id_000/000000.png"] != first["train/id_000/000000.png"]


def test_cached_until_parameters_change(tmp_path):
    root = generate_synthetic(tmp_path, TINY, num_workers=0)
    image = root / "train" / "id_000" / "000000.png"
    stamp = image.stat().st_mtime_ns
    generate_synthetic(root, TINY, num_workers=0)
    assert image.stat().st_mtime_ns == stamp, "a matching dataset must not be regenerated"
    changed = dataclasses.replace(TINY, train_images_per_identity=2)
    generate_synthetic(root, changed, num_workers=0)
    assert len(_read(root, "train")) == 6
    assert not (root / "train" / "id_000" / "000002.png").exists(), "stale images are removed"
    (root / "metadata.json").unlink()
    generate_synthetic(root, changed, num_workers=0)
    assert (root / "metadata.json").is_file()


def test_splits_are_disjoint_and_labels_in_range(probe_root):
    train, val = _read(probe_root, "train"), _read(probe_root, "val")
    train_ids = {r["subDirectory_filePath"].split("/")[0] for r in train}
    val_ids = {r["subDirectory_filePath"].split("/")[0] for r in val}
    assert len(train_ids) == len(val_ids) == 30
    assert train_ids.isdisjoint(val_ids)
    labels = np.array([[float(r["valence"]), float(r["arousal"])] for r in train + val])
    assert labels.min() >= -1.0 and labels.max() <= 1.0
    assert labels.std(axis=0).min() > 0.3, "labels must cover VA space, not a corner of it"


def _per_identity(rows):
    groups = {}
    for r in rows:
        groups.setdefault(r["subDirectory_filePath"].split("/")[0], []).append(r)
    return groups


def test_training_identities_cover_narrow_regions_test_identities_do_not(probe_root):
    def mean_spread(split):
        groups = _per_identity(_read(probe_root, split))
        return np.mean(
            [
                np.std([[float(r["valence"]), float(r["arousal"])] for r in g], axis=0).mean()
                for g in groups.values()
            ]
        )

    assert mean_spread("train") < 0.2
    assert mean_spread("val") > 0.3


def _cheek_luminance(root, split, rel):
    """Mean luminance of both cheeks at their nominal position (skin, away from features)."""
    pixels = np.asarray(Image.open(root / split / rel), dtype=np.float64)
    n = pixels.shape[0]
    row = round(0.6 * n)
    patches = [pixels[row - 1 : row + 1, c - 1 : c + 1] for c in (round(0.36 * n), round(0.64 * n))]
    return float(np.mean([p @ [0.299, 0.587, 0.114] for p in patches]))


def test_appearance_is_confounded_with_labels_in_train_only(probe_root):
    """Skin tone predicts an identity's valence in training, not in test."""
    correlations = {}
    for split in ("train", "val"):
        groups = _per_identity(_read(probe_root, split))
        skin, valence = [], []
        for rows in groups.values():
            skin.append(
                np.mean(
                    [_cheek_luminance(probe_root, split, r["subDirectory_filePath"]) for r in rows]
                )
            )
            valence.append(np.mean([float(r["valence"]) for r in rows]))
        correlations[split] = np.corrcoef(skin, valence)[0, 1]
    # Skin darkens as the identity's valence centre rises (by construction, plus lighting noise).
    assert correlations["train"] < -0.7, correlations
    assert abs(correlations["val"]) < 0.35, correlations


def test_unconfounded_training_split_loses_the_shortcut(tmp_path):
    config = dataclasses.replace(
        PROBE, confounding=0.0, n_test_identities=1, test_images_per_identity=1
    )
    root = generate_synthetic(tmp_path, config, num_workers=0)
    groups = _per_identity(_read(root, "train"))
    skin = [
        np.mean([_cheek_luminance(root, "train", r["subDirectory_filePath"]) for r in g])
        for g in groups.values()
    ]
    valence = [np.mean([float(r["valence"]) for r in g]) for g in groups.values()]
    assert abs(np.corrcoef(skin, valence)[0, 1]) < 0.35


@pytest.fixture
def plain_face():
    """A training face with no resting offset, unit gain and flat lighting."""
    face = sample_identities(SyntheticConfig(n_train_identities=1, n_test_identities=1))[
        0
    ].appearance
    return dataclasses.replace(
        face, neutral_offset=(0.0, 0.0), expressiveness=1.0, brightness=1.0, accessory="none"
    )


def _render(face, v, a, **kwargs):
    options = {"image_size": 96, "render_scale": 2, "light_strength": 0.0, **kwargs}
    return render_face(face, v, a, **options).astype(np.int32)


def test_expression_changes_only_the_face_features(plain_face):
    neutral = _render(plain_face, 0.0, 0.0)
    assert np.array_equal(neutral, _render(plain_face, 0.0, 0.0)), "rendering is deterministic"
    for v, a in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)):
        changed = np.abs(_render(plain_face, v, a) - neutral).sum(axis=2) > 30
        rows = np.flatnonzero(changed.any(axis=1))
        assert changed.sum() > 40, f"label ({v}, {a}) must move features"
        assert rows.min() > 0.3 * 96, "hair, forehead and background stay the same"


def test_mouth_curves_with_valence(plain_face):
    def lip_rows(pixels):
        n = pixels.shape[0]
        box = pixels[int(0.55 * n) : int(0.9 * n), int(0.3 * n) : int(0.7 * n)]
        lips = (box[..., 0] - box[..., 1]) > 80  # lip red; skin stays below ~60
        cols = np.flatnonzero(lips.any(axis=0))
        centre = lips[:, cols[len(cols) // 2 - 1 : len(cols) // 2 + 2]]
        corners = lips[:, np.r_[cols[:2], cols[-2:]]]
        return np.nonzero(centre)[0].mean(), np.nonzero(corners)[0].mean()

    centre, corners = lip_rows(_render(plain_face, 1.0, -0.5))
    assert centre > corners + 2, "smile: corners above the middle (image y grows downwards)"
    centre, corners = lip_rows(_render(plain_face, -1.0, -0.5))
    assert centre < corners - 2, "frown: corners below the middle"


def test_arousal_opens_eyes_and_mouth(plain_face):
    def counts(pixels):
        n = pixels.shape[0]
        eyes = pixels[int(0.35 * n) : int(0.55 * n)]
        mouth = pixels[int(0.6 * n) : int(0.9 * n), int(0.3 * n) : int(0.7 * n)]
        white = (eyes.min(axis=2) > 225).sum()
        cavity = ((mouth[..., 0] < 110) & (mouth[..., 1] < 40)).sum()
        return white, cavity

    calm_white, calm_cavity = counts(_render(plain_face, 0.0, -1.0))
    excited_white, excited_cavity = counts(_render(plain_face, 0.0, 1.0))
    assert excited_white > 2 * calm_white
    assert excited_cavity > 3 * calm_cavity


def test_jitter_makes_same_label_images_differ(plain_face):
    still = _render(plain_face, 0.3, 0.3)
    moved = _render(
        plain_face, 0.3, 0.3, jitter=Jitter(dx=0.02, dy=-0.01, scale=1.03, rotate_deg=3.0)
    )
    assert np.abs(still - moved).mean() > 1.0
    noisy = _render(plain_face, 0.3, 0.3, noise=0.02, rng=np.random.default_rng(0))
    assert 0 < np.abs(still - noisy).mean() < 10


def test_identities_differ_in_appearance():
    identities = sample_identities(PROBE)
    faces = [i.appearance for i in identities]
    assert len({f.skin for f in faces}) > 50 and len({f.hair_style for f in faces}) >= 4
    assert len({f.accessory for f in faces}) >= 3
    assert all(18 <= f.age <= 84 for f in faces)
    assert [i.va_centre is None for i in identities] == [False] * 30 + [True] * 30


def test_bad_parameters_raise():
    with pytest.raises(
        ValueError, match=r"SyntheticConfig\.n_train_identities must be an integer >= 1, got 0"
    ):
        SyntheticConfig(n_train_identities=0)
    with pytest.raises(
        ValueError, match=r"SyntheticConfig.confounding must be in \[0, 1\], got 1.5"
    ):
        SyntheticConfig(confounding=1.5)
    face = sample_identities(TINY)[0].appearance
    with pytest.raises(
        ValueError, match=r"`valence` and `arousal` must lie in \[-1, 1\], got \(1.2, 0.0\)"
    ):
        render_face(face, 1.2, 0.0)


def test_build_datasets_synthetic(tmp_path):
    train, val = build_datasets("synthetic", tmp_path, 16, synthetic_config=TINY, num_workers=0)
    assert (len(train), len(val)) == (9, 4)
    assert train.domain_kind == "identity" and train.identities.unique().numel() == 3
    assert train.ages.shape == (9,) and train.labels.shape == (9, 2)
    assert torch.all(train.labels.abs() <= 1)
    assert train[0][0].shape == (3, 18, 18) and val[0][0].shape == (3, 16, 16)  # resize 256/224
    _, val_age = build_datasets(
        "synthetic", tmp_path, 16, synthetic_config=TINY, domain="age", num_workers=0
    )
    assert val_age.domain_kind == "age_group"
    assert val_age.identities.max() <= 4
