"""catalog.sop on a miniature Stanford Online Products (same index files, 2×2 images)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from catalog import DatasetError, ImageRecord, read_dataset

HEADER = "image_id class_id super_class_id path\n"
# (image_id, class_id, super_class_id, path) as in the real files
TRAIN = [
    (1, 1, 1, "bicycle_final/111085122871_0.JPG"),
    (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
    (3, 2, 4, "chair_final/111265328556_0.JPG"),
    (4, 2, 4, "chair_final/111265328556_1.JPG"),
]
TEST = [(1, 11319, 1, "bicycle_final/111085122871_9.JPG"), (2, 11319, 1, "bicycle_final/111085122871_8.JPG"),
        (3, 11320, 10, "stapler_final/111085122871_7.JPG")]  # fmt: skip


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="JPEG")


def _make_sop(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, rows in (("Ebay_train.txt", TRAIN), ("Ebay_test.txt", TEST)):
        (directory / name).write_text(HEADER + "".join(" ".join(map(str, row)) + "\n" for row in rows))
        for *_, path in rows:
            _image(directory / path)
    return directory


def test_records(tmp_path):
    directory = _make_sop(tmp_path / "Stanford_Online_Products")
    records = read_dataset("sop", directory)
    root = directory.resolve()
    first = ImageRecord(str(root / "bicycle_final/111085122871_0.JPG"), "1", "train", group="bicycle_final")
    assert records[0] == first
    assert [(r.label, r.split, r.group) for r in records] == [
        ("1", "train", "bicycle_final"), ("1", "train", "bicycle_final"),
        ("2", "train", "chair_final"), ("2", "train", "chair_final"),
        ("11319", "test", "bicycle_final"), ("11319", "test", "bicycle_final"), ("11320", "test", "stapler_final"),
    ]  # fmt: skip
    assert all(Path(r.path).is_file() and r.chain is None for r in records)
    assert read_dataset("sop", tmp_path) == records  # the parent folder works too


def test_missing_test_file(tmp_path):
    directory = _make_sop(tmp_path / "sop")
    (directory / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match="missing Ebay_test.txt") as info:
        read_dataset("sop", directory)
    assert "Expected layout:" in str(info.value)


def test_missing_root_files_and_images(tmp_path):
    with pytest.raises(DatasetError, match="Ebay_train.txt not found in"):
        read_dataset("sop", tmp_path)
    directory = _make_sop(tmp_path / "sop")
    for folder in ("bicycle_final", "chair_final"):
        for image in (directory / folder).iterdir():
            image.unlink()
    with pytest.raises(DatasetError, match="Ebay_train.txt exist .* image folder seems to be missing"):
        read_dataset("sop", directory)


def test_bad_header(tmp_path):
    directory = _make_sop(tmp_path / "sop")
    (directory / "Ebay_train.txt").write_text("id class super path\n1 1 1 bicycle_final/a.JPG\n")
    with pytest.raises(DatasetError, match="Ebay_train.txt, line 1: expected the header 'image_id class_id"):
        read_dataset("sop", directory)
