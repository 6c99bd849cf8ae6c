"""catalog.read_folder: class folders split by class, split.csv, errors; registry and summaries."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import catalog
from catalog import DatasetError, ImageRecord, read_dataset, select_split, summarize


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)
    return path


def _tree(root: Path, layout: dict[str, list[str]]) -> None:
    for class_name, files in layout.items():
        for name in files:
            if name.endswith(".txt"):
                _touch(root / class_name / name)
            else:
                _image(root / class_name / name)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def test_class_folders_first_half_train(tmp_path):
    _tree(
        tmp_path,
        {
            "b_cls": ["2.PNG", "1.jpg", "sub/deeper/3.JPEG"],
            "a_cls": ["x.webp"],
            "d_cls": ["y.tif", "notes.txt", ".hidden.png"],
            "c_cls": ["z.bmp", "w.gif", "v.TIFF"],
            "e_cls": ["q.png"],
        },
    )
    records = read_dataset("folder", tmp_path)
    # 5 classes sorted by name: floor(5/2) = 2 train (a, b), 3 test (c, d, e)
    assert {r.label: r.split for r in records} == {
        "a_cls": "train", "b_cls": "train", "c_cls": "test", "d_cls": "test", "e_cls": "test",
    }  # fmt: skip
    root = tmp_path.resolve()
    b_paths = [r.path for r in records if r.label == "b_cls"]
    assert b_paths == [str(root / "b_cls/1.jpg"), str(root / "b_cls/2.PNG"), str(root / "b_cls/sub/deeper/3.JPEG")]
    assert [Path(r.path).name for r in records if r.label == "d_cls"] == ["y.tif"]  # no .txt, no hidden
    assert len(records) == 9
    assert all(isinstance(r, ImageRecord) and r.chain is None for r in records)


def test_empty_class_folders_are_not_classes(tmp_path):
    _tree(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    (tmp_path / "empty").mkdir()
    records = read_dataset("folder", tmp_path)
    assert {r.label: r.split for r in records} == {"a": "train", "b": "test"}


def test_split_csv(tmp_path):
    _image(tmp_path / "imgs" / "1.png")
    _image(tmp_path / "imgs" / "2.png")
    _image(tmp_path / "other" / "3.png")
    (tmp_path / "split.csv").write_text(
        "path,label,split,chain\nimgs/1.png,cat,train,\nimgs/2.png,dog,query,c7\nother/3.png,dog,gallery,c7\n"
    )
    records = read_dataset("folder", tmp_path)
    root = tmp_path.resolve()
    assert records == [
        ImageRecord(str(root / "imgs/1.png"), "cat", "train"),
        ImageRecord(str(root / "imgs/2.png"), "dog", "query", "c7"),
        ImageRecord(str(root / "other/3.png"), "dog", "gallery", "c7"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label,split\na.png,x,train\n", "missing path"),
        ("path,label,split\na.png,x,validation\n", "line 2: split 'validation'"),
        ("path,label,split\n/abs/a.png,x,train\n", "must be relative"),
        ("path,label,split\nmissing.png,x,train\n", "do not exist"),
        ("path,label,split\n", "no rows"),
    ],
)
def test_split_csv_errors(tmp_path, content, message):
    (tmp_path / "split.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_dataset("folder", tmp_path)


def test_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset("folder", tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class folders"):
        read_dataset("folder", tmp_path)
    _touch(tmp_path / "cls" / "readme.txt")
    with pytest.raises(DatasetError, match="no images found"):
        read_dataset("folder", tmp_path)


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*fashion-mnist.*folder"):
        read_dataset("imagenet", tmp_path)
    assert {"folder", "fashion-mnist"} <= set(catalog.DATASETS)


def test_dataset_names_match_the_training_defaults():
    """`sct train --dataset NAME` picks the paper's settings by the same name the reader is registered under."""
    from training.config import DATASET_DEFAULTS  # no torch: config.py needs only yaml

    assert set(catalog.DATASETS) == set(DATASET_DEFAULTS)
    assert {"cub", "cars", "sop", "inshop", "hotels50k"} <= set(catalog.DATASETS)


def test_select_split_and_summarize():
    records = [
        ImageRecord("a", "x", "train"),
        ImageRecord("b", "y", "train"),
        ImageRecord("c", "z", "test"),
        ImageRecord("d", "x", "train"),
    ]
    assert [r.path for r in select_split(records, "train")] == ["a", "b", "d"]
    with pytest.raises(ValueError, match="splits present: train, test"):
        select_split(records, "query")
    assert summarize(records) == "4 images, 3 classes; train: 3 images / 2 classes; test: 1 images / 1 classes"


def test_catalog_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, catalog, catalog.fashion_mnist, catalog.folder; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
