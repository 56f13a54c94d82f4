"""AffectNet's official CSVs: uncertain rows, ages and age-group domains, face crops."""

import pytest
import torch
from elim.data import AffectNetDataset, build_datasets
from PIL import Image

HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
    "expression,valence,arousal\n"
)
LANDMARKS = '"' + ";".join(str(float(i)) for i in range(136)) + '"'


def _row(path, valence, arousal, expression=1, box=(2, 3, 10, 12)):
    x, y, w, h = box
    return f"{path},{x},{y},{w},{h},{LANDMARKS},{expression},{valence},{arousal}\n"


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "Manually_Annotated_Images"
    train_rows = [
        ("689/a.jpg", 0.5, 0.25, 1),
        ("689/b.jpg", -2, -2, 9),  # uncertain: skipped
        ("12/c.jpg", -0.75, 0.9, 6),
        ("12/d.jpg", 0.1, -2, 10),  # one uncertain label is enough to skip
        ("3/e.jpg", 0.0, -0.5, 0),
    ]
    val_rows = [("7/f.jpg", 0.3, 0.3, 1), ("7/g.jpg", -0.3, 0.1, 2)]
    for rel, *_ in train_rows + val_rows:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 20), (200, 10, 10)).save(images / rel)
    (tmp_path / "training.csv").write_text(
        HEADER + "".join(_row(r, v, a, e) for r, v, a, e in train_rows)
    )
    (tmp_path / "validation.csv").write_text(
        HEADER + "".join(_row(r, v, a, e) for r, v, a, e in val_rows)
    )
    (tmp_path / "ages.csv").write_text(
        "subDirectory_filePath,age\n689/a.jpg,23\n689/b.jpg,40\n12/c.jpg,47\n3/e.jpg,66\n"
        "7/f.jpg,35\n7/g.jpg,52\n"
    )
    return tmp_path


def test_uncertain_rows_are_skipped(root):
    ds = AffectNetDataset(root / "training.csv", root / "Manually_Annotated_Images")
    assert len(ds) == 3 and ds.n_uncertain == 2
    assert ds.relative_paths == ["689/a.jpg", "12/c.jpg", "3/e.jpg"]
    assert torch.allclose(ds.labels, torch.tensor([[0.5, 0.25], [-0.75, 0.9], [0.0, -0.5]]))
    assert ds.expressions.tolist() == [1, 6, 0]
    assert ds.domain_kind == "image" and ds.identities.tolist() == [0, 1, 2]
    assert ds.ages is None
    image, label, domain = ds[1]
    assert (
        image.shape == (3, 20, 16) and label.tolist() == [-0.75, pytest.approx(0.9)] and domain == 1
    )


def test_age_file_gives_age_group_domains(root):
    ds = AffectNetDataset(
        root / "training.csv", root / "Manually_Annotated_Images", age_file=root / "ages.csv"
    )
    assert ds.ages.tolist() == [23, 47, 66]
    assert ds.domain_kind == "age_group"
    assert ds.identities.tolist() == [0, 2, 4]
    assert ds.identity_names[ds.identities[2]] == "60-84"


def test_missing_age_raises_or_drops(root):
    ages = root / "few_ages.csv"
    ages.write_text("subDirectory_filePath,age\n689/a.jpg,23\n3/e.jpg,66\n")
    csv_path, images = root / "training.csv", root / "Manually_Annotated_Images"
    with pytest.raises(
        ValueError, match=r"training\.csv, row 3 \(line 4\): image '12/c\.jpg' has no age"
    ):
        AffectNetDataset(csv_path, images, age_file=ages)
    ds = AffectNetDataset(csv_path, images, age_file=ages, missing_age="drop")
    assert ds.relative_paths == ["689/a.jpg", "3/e.jpg"] and ds.n_missing_age == 1


def test_age_file_must_be_per_image(root):
    ages = root / "id_ages.csv"
    ages.write_text("identity,age\nx,30\n")
    with pytest.raises(
        ValueError, match=r"id_ages\.csv: AffectNet ages must be keyed by 'subDirectory_filePath'"
    ):
        AffectNetDataset(root / "training.csv", root, age_file=ages)


def test_face_crop(root):
    ds = AffectNetDataset(root / "training.csv", root / "Manually_Annotated_Images", crop_face=True)
    assert ds[0][0].shape == (3, 12, 10)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            _row("689/a.jpg", 1.3, 0.0),
            r"training\.csv, row 2 \(line 3\): valence must lie in \[-1, 1\], got 1\.3",
        ),
        (
            _row("689/a.jpg", 0.0, -1.5),
            r"training\.csv, row 2 \(line 3\): arousal must lie in \[-1, 1\]",
        ),
        (
            _row("689/zz.jpg", 0.0, 0.0),
            r"training\.csv, row 2 \(line 3\): image file .*689/zz\.jpg does not exist",
        ),
        (
            _row("689/a.jpg", 0.0, 0.0, expression=1.5),
            r"training\.csv, row 2 \(line 3\): expression must be an integer",
        ),
        ("689/a.jpg,1,2,3\n", r"training\.csv, row 2 \(line 3\): expected 9 fields"),
    ],
)
def test_bad_rows_name_file_and_row(root, row, match):
    path = root / "training.csv"
    path.write_text(HEADER + _row("3/e.jpg", 0.1, 0.1) + row)
    with pytest.raises(ValueError, match=match):
        AffectNetDataset(path, root / "Manually_Annotated_Images")


def test_bad_face_box(root):
    path = root / "training.csv"
    path.write_text(HEADER + _row("3/e.jpg", 0.1, 0.1, box=(0, 0, 0, 5)))
    with pytest.raises(
        ValueError, match=r"row 1 \(line 2\): face_width and face_height must be > 0"
    ):
        AffectNetDataset(path, root / "Manually_Annotated_Images", crop_face=True)


def test_build_datasets_affectnet(root):
    train, val = build_datasets("affectnet", root, 8, age_file=root / "ages.csv")
    assert (len(train), len(val)) == (3, 2)
    assert train.domain_kind == val.domain_kind == "age_group"
    assert val.identities.tolist() == [1, 3]
    assert train[0][0].shape == (3, 9, 9) and val[0][0].shape == (3, 8, 8)  # resize 8 * 256/224
    plain, _ = build_datasets("affectnet", root, 8)
    assert plain.domain_kind == "image"
    with pytest.raises(ValueError, match="AffectNet has no identities"):
        build_datasets("affectnet", root, 8, domain="identity")
    with pytest.raises(ValueError, match="`domain`='age' needs an `age_file`"):
        build_datasets("affectnet", root, 8, domain="age")
