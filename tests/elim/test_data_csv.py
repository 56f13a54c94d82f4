"""The released code's CSV layout: parsing, validation errors, ages, transforms, factory."""

import numpy as np
import pytest
import torch
from elim.data import VACsvDataset, build_datasets, make_transform
from elim.data.base import augment, normalize
from PIL import Image
from torch.utils.data import DataLoader

HEADER = "subDirectory_filePath,valence,arousal\n"


def _image(path, colour, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def layout(tmp_path):
    """``root/{train,val}`` with two identities per split and per-identity ages."""
    rows = {
        "train": [
            ("clipB/0.png", 0.5, -0.25),
            ("clipA/0.png", -1.0, 1.0),
            ("clipA/1.png", 0.0, 0.1),
        ],
        "val": [("clipC/0.png", 0.2, 0.3), ("clipD/0.png", -0.4, -0.9)],
    }
    for split, csv_name in (("train", "training.csv"), ("val", "validation.csv")):
        for k, (rel, _, _) in enumerate(rows[split]):
            _image(tmp_path / split / rel, (40 * k, 100, 200))
        text = HEADER + "".join(f"{r},{v},{a}\n" for r, v, a in rows[split])
        (tmp_path / split / csv_name).write_text(text)
    (tmp_path / "train" / "ages.csv").write_text("identity,age\nclipA,25\nclipB,61\n")
    (tmp_path / "val" / "ages.csv").write_text("identity,age\nclipC,45\nclipD,33\n")
    return tmp_path


def test_reads_rows_labels_and_identities(layout):
    ds = VACsvDataset(layout / "train" / "training.csv")
    assert len(ds) == 3
    assert ds.identity_names == ["clipA", "clipB"]
    assert ds.identities.tolist() == [1, 0, 0]
    assert ds.identities.dtype == torch.int64
    assert torch.allclose(ds.labels, torch.tensor([[0.5, -0.25], [-1.0, 1.0], [0.0, 0.1]]))
    assert ds.domain_kind == "identity"
    assert ds.ages is None
    image, label, identity = ds[1]
    assert image.shape == (3, 24, 20) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label.shape == (2,) and label.tolist() == [-1.0, 1.0]
    assert ds.identity_names[identity] == "clipA"


def test_extra_columns_and_blank_lines_are_accepted(tmp_path):
    _image(tmp_path / "x" / "0.png", (1, 2, 3))
    (tmp_path / "t.csv").write_text(",subDirectory_filePath,valence,arousal\n0,x/0.png,0.1,0.2\n\n")
    ds = VACsvDataset(tmp_path / "t.csv")
    assert len(ds) == 1 and ds.labels.tolist() == [[pytest.approx(0.1), pytest.approx(0.2)]]


def test_from_root_reads_ages_and_age_domains(layout):
    ds = VACsvDataset.from_root(layout, "train")
    assert ds.ages.tolist() == [61, 25, 25]
    by_age = VACsvDataset.from_root(layout, "train", domain="age")
    assert by_age.domain_kind == "age_group"
    assert by_age.identities.tolist() == [4, 0, 0]
    assert by_age.identity_names[4] == "60-84"


def test_per_image_age_file(layout):
    ages = layout / "img_ages.csv"
    ages.write_text("subDirectory_filePath,age\nclipB/0.png,40\nclipA/0.png,30\nclipA/1.png,31\n")
    ds = VACsvDataset(layout / "train" / "training.csv", age_file=ages, domain="age")
    assert ds.ages.tolist() == [40, 30, 31]
    assert ds.identities.tolist() == [2, 1, 1]


def test_missing_age_names_the_age_file(layout):
    ages = layout / "partial.csv"
    ages.write_text("identity,age\nclipA,25\n")
    with pytest.raises(
        ValueError, match=r"partial\.csv: no age for 1 identity value\(s\).*'clipB'"
    ):
        VACsvDataset(layout / "train" / "training.csv", age_file=ages)


def test_malformed_age_names_file_and_row(layout):
    ages = layout / "bad_ages.csv"
    ages.write_text("identity,age\nclipA,25\nclipB,old\n")
    with pytest.raises(
        ValueError, match=r"bad_ages\.csv, row 2 \(line 3\): column 'age' must be a number"
    ):
        VACsvDataset(layout / "train" / "training.csv", age_file=ages)


def _write(tmp_path, body):
    path = tmp_path / "training.csv"
    path.write_text(HEADER + body)
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        _image(tmp_path / name, (0, 0, 0))
    return path


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            "a/0.png,0.1,0.1\na/9.png,0.1,0.1\n",
            r"training\.csv, row 2 \(line 3\): image file .*a/9\.png does not exist",
        ),
        ("a/0.png,0.1,0.1\na/1.png,0.1\n", r"training\.csv, row 2 \(line 3\): expected 3 fields"),
        (
            "a/0.png,0.1,0.1\na/1.png,0.1,0.2\nb/0.png,1.5,0.0\n",
            r"training\.csv, row 3 \(line 4\): valence must lie in \[-1, 1\], got 1\.5",
        ),
        ("a/0.png,0.1,-1.01\n", r"training\.csv, row 1 \(line 2\): arousal must lie in \[-1, 1\]"),
        (
            "a/0.png,abc,0.0\n",
            r"training\.csv, row 1 \(line 2\): column 'valence' must be a number, got 'abc'",
        ),
        ("a/0.png,nan,0.0\n", r"training\.csv, row 1 \(line 2\): column 'valence' must be finite"),
        (
            "0.png,0.1,0.0\n",
            r"training\.csv, row 1 \(line 2\): subDirectory_filePath must look like '<identity>/<file>'",
        ),
        ("", r"training\.csv: no data rows"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, body, match):
    path = _write(tmp_path, body)
    with pytest.raises(ValueError, match=match):
        VACsvDataset(path)


def test_missing_header_column_and_missing_file(tmp_path):
    path = tmp_path / "training.csv"
    path.write_text("subDirectory_filePath,valence\na/0.png,0.1\n")
    with pytest.raises(
        ValueError, match=r"training\.csv: header is missing column\(s\) \['arousal'\]"
    ):
        VACsvDataset(path)
    with pytest.raises(ValueError, match=r"CSV file .*nothere\.csv does not exist"):
        VACsvDataset(tmp_path / "nothere.csv")


def test_unreadable_image_names_file_and_row(tmp_path):
    path = _write(tmp_path, "a/0.png,0.1,0.1\nb/0.png,0.0,0.0\n")
    (tmp_path / "b" / "0.png").write_bytes(b"not a png")
    ds = VACsvDataset(path)
    assert ds[0][0].shape == (3, 24, 20)
    with pytest.raises(
        ValueError, match=r"training\.csv, row 2 \(line 3\): cannot read image .*b/0\.png"
    ):
        ds[1]


def test_argument_errors(layout):
    with pytest.raises(ValueError, match="`domain` must be 'identity' or 'age', got 'clip'"):
        VACsvDataset(layout / "train" / "training.csv", domain="clip")
    with pytest.raises(ValueError, match="`domain`='age' needs an `age_file`"):
        VACsvDataset(layout / "train" / "training.csv", domain="age")
    with pytest.raises(ValueError, match=r"`split` must be one of \['train', 'val'\], got 'test'"):
        VACsvDataset.from_root(layout, "test")


def test_one_image_pipeline_deterministic_decode_then_batch_augmentation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    train = make_transform(16, train=True)
    evaluate = make_transform(16, train=False)
    side = round(16 * 256 / 224)  # the released resize-to-crop ratio
    assert train(image).shape == (3, side, side) and evaluate(image).shape == (3, 16, 16)
    assert train(image).dtype == evaluate(image).dtype == torch.uint8
    assert torch.equal(train(image), train(image)), "decoding is deterministic"
    # The centre of the training resize is the evaluation crop.
    offset = (side - 16) // 2
    assert torch.equal(train(image)[:, offset : offset + 16, offset : offset + 16], evaluate(image))
    # The random half runs per batch from a generator: crops of the decoded image.
    batch = torch.stack([train(image)] * 6)
    crops = augment(batch, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 16, 16)
    assert any(not torch.equal(crops[0], c) for c in crops[1:]), "crops/flips must vary"
    scaled = normalize(evaluate(image)[None])
    assert scaled.dtype == torch.float32 and scaled.min() < 0.0 < scaled.max()
    with pytest.raises(ValueError, match="`image_size` must be an integer >= 1, got 0"):
        make_transform(0, train=True)


def test_build_datasets_csv_uniform_interface(layout):
    train, val = build_datasets("csv", layout, 16)
    for ds, n in ((train, 3), (val, 2)):
        assert len(ds) == n
        assert ds.labels.shape == (n, 2) and ds.labels.dtype == torch.float32
        assert ds.identities.shape == (n,) and ds.ages.shape == (n,)
        assert ds.labels.abs().max() <= 1.0
    assert set(train.identity_names).isdisjoint(val.identity_names)
    images, labels, ids = next(iter(DataLoader(train, batch_size=3)))
    # Training images come out at the released resize (18 = 16 * 256/224), uint8, for the
    # random crop of the batch augmentation.
    assert images.shape == (3, 3, 18, 18) and images.dtype == torch.uint8
    assert labels.shape == (3, 2) and ids.dtype == torch.int64
    _, val_age = build_datasets("csv", layout, 16, domain="age")
    assert val_age.identities.tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"`kind` must be one of .*got 'imagenet'"):
        build_datasets("imagenet", layout)
    with pytest.raises(ValueError, match="`domain`='image' is only for kind 'affectnet'"):
        build_datasets("csv", layout, domain="image")
