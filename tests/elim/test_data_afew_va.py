"""Raw AFEW-VA (clip folders + per-clip JSON) to the CSV layout."""

import json

import pytest
import torch
from elim.data import VACsvDataset, build_datasets, convert_afew_va, read_clip
from elim.data.afew_va import main
from PIL import Image

# Six clips, three actors (two clips each); labels on AFEW-VA's [-10, 10] scale.
ACTORS = ["Jane Doe", "John Roe", "Jane Doe", "Max Mustermann", "John Roe", "Max Mustermann"]


def _clip(raw, index, actor, n_frames=3, **overrides):
    name = f"{index:03d}"
    folder = raw / name
    folder.mkdir(parents=True)
    frames = {}
    for k in range(n_frames):
        key = f"{k:05d}"
        Image.new("RGB", (12, 10), (index * 20, k * 50, 9)).save(folder / f"{key}.png")
        frames[key] = {"valence": float(index - k), "arousal": -2.5 * k, "landmarks": [[1, 2]] * 68}
    meta = {"actor": actor, "video_id": name, "frames": frames, **overrides}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "AFEW-VA"
    for index, actor in enumerate(ACTORS, start=1):
        _clip(root, index, actor)
    (root / "README").write_text("not a clip")
    return root


def _rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "subDirectory_filePath,valence,arousal"
    return [(p, float(v), float(a)) for p, v, a in (line.split(",") for line in lines[1:])]


def test_clip_identities_split_and_labels(raw, tmp_path):
    out = convert_afew_va(raw, tmp_path / "out", val_fraction=0.34, seed=0)
    train = _rows(out / "train" / "training.csv")
    val = _rows(out / "val" / "validation.csv")
    assert len(train) + len(val) == 18
    train_ids = {p.split("/")[0] for p, _, _ in train}
    val_ids = {p.split("/")[0] for p, _, _ in val}
    assert len(val_ids) == 2 and len(train_ids) == 4
    assert train_ids.isdisjoint(val_ids)
    labels = dict((p, (v, a)) for p, v, a in train + val)
    assert labels["003/00001.png"] == (pytest.approx(0.2), pytest.approx(-0.25))
    assert all(-1 <= v <= 1 and -1 <= a <= 1 for v, a in labels.values())
    ds = VACsvDataset.from_root(out, "train")
    assert len(ds) == 12 and sorted(ds.identity_names) == sorted(train_ids)
    assert ds[0][0].shape == (3, 10, 12)


def test_actor_identities_never_straddle_the_split(raw, tmp_path):
    out = convert_afew_va(raw, tmp_path / "out", identity="actor", val_fraction=0.34, seed=3)
    train = _rows(out / "train" / "training.csv")
    val = _rows(out / "val" / "validation.csv")
    train_ids = {p.split("/")[0] for p, _, _ in train}
    val_ids = {p.split("/")[0] for p, _, _ in val}
    assert train_ids | val_ids == {"Jane_Doe", "John_Roe", "Max_Mustermann"}
    assert train_ids.isdisjoint(val_ids) and len(val_ids) == 1
    assert {p.split("/")[1] for p, _, _ in val if p.startswith("Jane_Doe")} <= {"001", "003"}
    ds = VACsvDataset.from_root(out, "val")
    assert ds.identity_names == sorted(val_ids) and len(ds) == 6


def test_split_is_seeded(raw, tmp_path):
    def val_ids(seed):
        out = convert_afew_va(raw, tmp_path / f"s{seed}", val_fraction=0.5, seed=seed)
        return {p.split("/")[0] for p, _, _ in _rows(out / "val" / "validation.csv")}

    assert val_ids(1) == val_ids(1)
    assert len({frozenset(val_ids(s)) for s in range(6)}) > 1


def test_copy_mode_writes_real_files(raw, tmp_path):
    out = convert_afew_va(raw, tmp_path / "out", link="copy")
    first = _rows(out / "train" / "training.csv")[0][0]
    image = out / "train" / first
    assert image.is_file() and not image.parent.is_symlink()
    assert image.read_bytes() == (raw / first).read_bytes()


def test_conversion_is_cached_until_arguments_change(raw, tmp_path):
    out = convert_afew_va(raw, tmp_path / "out", seed=0)
    record = out / "conversion.json"
    stamp = record.stat().st_mtime_ns
    convert_afew_va(raw, out, seed=0)
    assert record.stat().st_mtime_ns == stamp
    convert_afew_va(raw, out, seed=1)
    assert json.loads(record.read_text())["seed"] == 1


def test_build_datasets_afew_va(raw, tmp_path):
    train, val = build_datasets(
        "afew-va", raw, 8, converted_root=tmp_path / "conv", val_fraction=0.34
    )
    assert len(train) + len(val) == 18
    assert train.domain_kind == "identity" and train.ages is None
    assert train.labels.shape == (len(train), 2) and torch.all(train.labels.abs() <= 1)
    assert train[0][0].shape == (3, 9, 9) and val[0][0].shape == (3, 8, 8)  # resize 8 * 256/224
    assert set(train.identity_names).isdisjoint(val.identity_names)


def test_cli(raw, tmp_path, capsys):
    main([str(raw), str(tmp_path / "cli"), "--identity", "actor", "--seed", "2"])
    assert "training.csv" in capsys.readouterr().out
    assert (tmp_path / "cli" / "val" / "validation.csv").is_file()


def test_missing_json_names_the_file(raw, tmp_path):
    (raw / "004" / "004.json").unlink()
    with pytest.raises(ValueError, match=r"clip folder .*004 has no label file .*004/004\.json"):
        convert_afew_va(raw, tmp_path / "out")


def test_invalid_json_names_the_file(raw, tmp_path):
    (raw / "002" / "002.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"002/002\.json: not valid JSON"):
        convert_afew_va(raw, tmp_path / "out")


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (
            {"valence": 12.0, "arousal": 0.0},
            r"007\.json, frame '00001': valence must lie in \[-10, 10\], got 12",
        ),
        (
            {"valence": 1.0, "arousal": "x"},
            r"007\.json, frame '00001': column 'arousal' must be a number",
        ),
        (
            {"valence": 1.0},
            r"007\.json, frame '00001': expected an object with 'valence' and 'arousal'",
        ),
    ],
)
def test_bad_frame_labels_name_file_and_frame(raw, tmp_path, frame, match):
    folder = _clip(raw, 7, "X")
    meta = json.loads((folder / "007.json").read_text())
    meta["frames"]["00001"] = frame
    (folder / "007.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        convert_afew_va(raw, tmp_path / "out")


def test_labelled_frame_without_image(raw, tmp_path):
    (raw / "005" / "00002.png").unlink()
    with pytest.raises(
        ValueError, match=r"005\.json: frame '00002' is labelled but its image .*005/00002\.png"
    ):
        read_clip(raw / "005")


def test_actor_mode_needs_actor(raw, tmp_path):
    _clip(raw, 8, "")
    with pytest.raises(
        ValueError, match=r"008\.json: `identity`='actor' needs a non-empty 'actor'"
    ):
        convert_afew_va(raw, tmp_path / "out", identity="actor")


def test_argument_errors(raw, tmp_path):
    with pytest.raises(ValueError, match=r"`identity` must be one of .*got 'person'"):
        convert_afew_va(raw, tmp_path / "o", identity="person")
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \(0, 1\), got 1\.0"):
        convert_afew_va(raw, tmp_path / "o", val_fraction=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`raw_root` .*empty has no clip folders"):
        convert_afew_va(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(ValueError, match=r"`raw_root` .*missing is not a folder"):
        convert_afew_va(tmp_path / "missing", tmp_path / "o2")
