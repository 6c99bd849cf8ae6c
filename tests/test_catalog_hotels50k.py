"""catalog.hotels50k on a miniature Hotels-50K: the image folders, with and without the dataset's CSV files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from catalog import DatasetError, ImageRecord, read_dataset

# (chain_id, hotel_id, source, image_id) of each training image
TRAIN = [
    ("5", "1001", "travel_website", "11"),
    ("5", "1001", "traffickcam", "12"),
    ("5", "1002", "travel_website", "13"),
    ("88", "2001", "travel_website", "14"),
]
QUERY = [("5", "1001", "traffickcam", "91"), ("88", "2001", "traffickcam", "92")]  # fmt: skip
HOTEL_INFO = (
    "hotel_id,hotel_name,chain_id,latitude,longitude\n"
    '1001,"Inn One, Downtown",5,38.9,-77.0\n'
    "1002,Inn Two,5,40.7,-74.0\n"
    "2001,Lodge,88,51.5,-0.1\n"
)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="JPEG")


def _make_images(root: Path, *, with_source: bool = True) -> Path:
    for split_dir, rows in (("images/train", TRAIN), ("images/test/unoccluded", QUERY)):
        for chain, hotel, source, image_id in rows:
            _image(root / split_dir / chain / hotel / (source if with_source else "") / f"{image_id}.jpg")
    return root


def _write_csvs(root: Path, extra_rows: str = "") -> None:
    dataset = root / "input" / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "hotel_info.csv").write_text(HOTEL_INFO)
    (dataset / "chain_info.csv").write_text("chain_id,chain_name\n5,Chain Five\n88,Chain Eighty-Eight\n")
    rows = [f"{image_id},{hotel},https://images.example/{image_id}/photo.jpg,{source},2016-05-01 10:00:00\n"
            for _, hotel, source, image_id in TRAIN]  # fmt: skip
    (dataset / "train_set.csv").write_text(
        "image_id,hotel_id,image_url,image_source,upload_timestamp\n" + "".join(rows) + extra_rows
    )


@pytest.mark.parametrize("with_source", [True, False])
def test_folder_layout(tmp_path, with_source):
    root = _make_images(tmp_path / "hotels", with_source=with_source)
    records = read_dataset("hotels50k", root)
    assert [(r.label, r.chain, r.split) for r in records] == [
        ("1001", "5", "train"), ("1001", "5", "train"), ("1002", "5", "train"), ("2001", "88", "train"),
        ("1001", "5", "query"), ("2001", "88", "query"),
    ]  # fmt: skip
    source = "traffickcam/" if with_source else ""
    assert records[4] == ImageRecord(
        str(root.resolve() / f"images/test/unoccluded/5/1001/{source}91.jpg"), "1001", "query", chain="5"
    )
    assert all(Path(r.path).is_file() for r in records)


def test_csv_files_list_the_training_images(tmp_path):
    root = _make_images(tmp_path / "hotels")
    # one more listed image whose download failed: listed, left to the loader; its URL gives the extension
    _write_csvs(root, extra_rows="15,2001,https://images.example/15/photo.png,travel_website,2017-01-01 00:00:00\n")
    records = read_dataset("hotels50k", root)
    train = [r for r in records if r.split == "train"]
    assert [(r.label, r.chain) for r in train] == [("1001", "5"), ("1001", "5"), ("1002", "5"), ("2001", "88"),
                                                   ("2001", "88")]  # fmt: skip
    assert train[1].path == str(root.resolve() / "images/train/5/1001/traffickcam/12.jpg")
    assert train[-1].path == str(root.resolve() / "images/train/88/2001/travel_website/15.png")
    assert [Path(r.path).is_file() for r in train] == [True, True, True, True, False]
    assert [(r.label, r.chain) for r in records if r.split == "query"] == [("1001", "5"), ("2001", "88")]


def test_csv_errors(tmp_path):
    root = _make_images(tmp_path / "hotels")
    _write_csvs(root, extra_rows="16,3003,https://images.example/16/photo.jpg,travel_website,2017-01-01\n")
    with pytest.raises(DatasetError, match="train_set.csv, line 6: hotel 3003 is not in hotel_info.csv"):
        read_dataset("hotels50k", root)
    shutil.rmtree(root / "input")
    _write_csvs(root)
    shutil.rmtree(root / "images" / "train")
    with pytest.raises(DatasetError, match="train_set.csv exist .* image folder seems to be missing") as info:
        read_dataset("hotels50k", root)
    assert "images/\n" in str(info.value) and "train/<chain_id>/<hotel_id>/<source>/<image_id>.jpg" in str(info.value)


@pytest.mark.parametrize(
    ("remove", "message"),
    [("images/test", r"missing folder .*images/test/unoccluded"), ("images/train", r"missing folder .*images/train")],
)
def test_missing_folders(tmp_path, remove, message):
    root = _make_images(tmp_path / "hotels")
    shutil.rmtree(root / remove)
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset("hotels50k", root)
    assert "Expected layout:" in str(info.value)


def test_empty_query_folder(tmp_path):
    root = _make_images(tmp_path / "hotels")
    shutil.rmtree(root / "images/test/unoccluded")
    (root / "images/test/unoccluded/5/1001").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images found in .*unoccluded/<chain_id>/<hotel_id>/"):
        read_dataset("hotels50k", root)
