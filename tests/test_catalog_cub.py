"""catalog.cub on a miniature CUB-200-2011 (same file names and formats, 2×2 images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from catalog import DatasetError, ImageRecord, read_dataset

CLASSES = {99: "099.Ovenbird", 100: "100.Brown_Pelican", 101: "101.White_Pelican", 102: "102.Western_Wood_Pewee"}


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)


def _make_cub(directory: Path, *, classes_txt: bool = True) -> Path:
    """Two images per class, ids numbered as in the real files (1-based, in class order)."""
    directory.mkdir(parents=True)
    images, labels = [], []
    for class_id, folder in CLASSES.items():
        for k in range(2):
            image_id = len(images) + 1
            relative = f"{folder}/{folder.split('.')[1]}_{k:04d}_{image_id}.jpg"
            images.append(f"{image_id} {relative}\n")
            labels.append(f"{image_id} {class_id}\n")
            _image(directory / "images" / relative)
    (directory / "images.txt").write_text("".join(images))
    (directory / "image_class_labels.txt").write_text("".join(labels))
    if classes_txt:
        (directory / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in CLASSES.items()))
    return directory


@pytest.mark.parametrize("classes_txt", [True, False])
def test_records_split_by_class(tmp_path, classes_txt):
    directory = _make_cub(tmp_path / "CUB_200_2011", classes_txt=classes_txt)
    records = read_dataset("cub", directory)
    assert len(records) == 8
    assert {r.label: r.split for r in records} == {
        "099.Ovenbird": "train", "100.Brown_Pelican": "train",
        "101.White_Pelican": "test", "102.Western_Wood_Pewee": "test",
    }  # fmt: skip
    assert records[0] == ImageRecord(
        str(directory.resolve() / "images/099.Ovenbird/Ovenbird_0000_1.jpg"), "099.Ovenbird", "train"
    )
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert all(r.chain is None and r.group is None for r in records)


def test_parent_folder_is_accepted(tmp_path):
    _make_cub(tmp_path / "CUB_200_2011")
    assert read_dataset("cub", tmp_path) == read_dataset("cub", tmp_path / "CUB_200_2011")


def test_missing_images_are_left_to_the_loader(tmp_path):
    directory = _make_cub(tmp_path / "cub")
    (directory / "images/101.White_Pelican/White_Pelican_0000_5.jpg").unlink()
    assert len(read_dataset("cub", directory)) == 8


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("images.txt", r"images.txt not found in .* or .*CUB_200_2011"),
        ("image_class_labels.txt", "missing image_class_labels.txt"),
        ("images", "none of the first 5 images listed in .*images.txt exist .* image folder seems to be missing"),
    ],
)
def test_missing_parts(tmp_path, remove, message):
    directory = _make_cub(tmp_path / "cub")
    target = directory / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset("cub", directory)
    assert "Expected layout:" in str(info.value) and "image_class_labels.txt" in str(info.value)


def test_bad_index_files(tmp_path):
    directory = _make_cub(tmp_path / "cub")
    with (directory / "images.txt").open("a") as file:
        file.write("9 102.Western_Wood_Pewee/extra.jpg\n")
    with pytest.raises(DatasetError, match="image 9 .* has no class in image_class_labels.txt"):
        read_dataset("cub", directory)
    (directory / "image_class_labels.txt").write_text("1 one\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt, line 1: class id 'one' is not an integer"):
        read_dataset("cub", directory)
    (directory / "image_class_labels.txt").write_text("1 99\n")
    (directory / "images.txt").write_text("1\n")
    with pytest.raises(DatasetError, match=r"images.txt, line 1: expected 2 fields"):
        read_dataset("cub", directory)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("cub", tmp_path / "nowhere")
