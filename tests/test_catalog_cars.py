"""catalog.cars on miniature Cars196 copies: the original layout and torchvision's devkit layout.

The .mat files are written with scipy.io.savemat in the shape of the real ones:
1×N struct arrays 'annotations' (uint8 class, uint16 bounding box) and 1×N cell
arrays of strings 'class_names'.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from catalog import DatasetError, read_dataset

CLASS_NAMES = [f"Make Model {i} 2012" for i in range(1, 101)]  # classes 1..100 (of the real 196)
CLASSES = (97, 98, 99, 100)  # straddle the split: 1..98 train, 99..196 test


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)


def _bbox() -> dict:
    return {"bbox_x1": np.uint16(1), "bbox_y1": np.uint16(2), "bbox_x2": np.uint16(300), "bbox_y2": np.uint16(200)}


def _struct_array(rows: list[dict]) -> np.ndarray:
    """A 1×N MATLAB struct array with the fields of the rows' keys."""
    array = np.empty((1, len(rows)), dtype=[(field, object) for field in rows[0]])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row.values())
    return array


def _cell_array(strings: list[str]) -> np.ndarray:
    """A 1×N MATLAB cell array of char arrays."""
    array = np.empty((1, len(strings)), dtype=object)
    array[0, :] = strings
    return array


def write_mat(
    path: Path, *, annotations: list[dict] | None = None, class_names: list[str] | None = None, compress: bool = True
) -> Path:
    variables = {}
    if annotations is not None:
        variables["annotations"] = _struct_array(annotations)
    if class_names is not None:
        variables["class_names"] = _cell_array(class_names)
    scipy.io.savemat(path, variables, do_compression=compress)
    return path


def _make_original(directory: Path) -> Path:
    """cars_annos.mat + car_ims/; the 'test' flags cut across classes, as in the real file."""
    directory.mkdir(parents=True)
    annotations = []
    for class_id in CLASSES:
        for k in range(2):
            relative = f"car_ims/{len(annotations) + 1:06d}.jpg"
            annotations.append(
                {"relative_im_path": relative, **_bbox(), "class": np.uint8(class_id), "test": np.uint8(k)}
            )
            _image(directory / relative)
    write_mat(directory / "cars_annos.mat", annotations=annotations, class_names=CLASS_NAMES)
    return directory


def _make_devkit(directory: Path, *, test_annotations_in_devkit: bool = False) -> Path:
    """stanford_cars/ as torchvision expects it; each half holds images of every class."""
    (directory / "devkit").mkdir(parents=True)
    write_mat(directory / "devkit" / "cars_meta.mat", class_names=CLASS_NAMES, compress=False)
    for half, annotations_file in (
        ("cars_train", directory / "devkit" / "cars_train_annos.mat"),
        ("cars_test", directory / ("devkit" if test_annotations_in_devkit else "") / "cars_test_annos_withlabels.mat"),
    ):
        annotations = []
        for class_id in CLASSES:
            fname = f"{len(annotations) + 1:05d}.jpg"
            annotations.append({**_bbox(), "class": np.uint8(class_id), "fname": fname})
            _image(directory / half / fname)
        write_mat(annotations_file, annotations=annotations)
    return directory


def _split_of(records) -> dict[str, str]:
    return {r.label: r.split for r in records}


EXPECTED_SPLITS = {
    "Make Model 97 2012": "train", "Make Model 98 2012": "train",
    "Make Model 99 2012": "test", "Make Model 100 2012": "test",
}  # fmt: skip


def test_original_layout(tmp_path):
    directory = _make_original(tmp_path / "cars")
    records = read_dataset("cars", directory)
    assert len(records) == 8
    assert _split_of(records) == EXPECTED_SPLITS
    assert records[0].path == str(directory.resolve() / "car_ims/000001.jpg")
    assert records[0].label == "Make Model 97 2012"
    assert all(Path(r.path).is_file() and r.chain is None and r.group is None for r in records)


@pytest.mark.parametrize("root_is_parent", [False, True])
@pytest.mark.parametrize("test_annotations_in_devkit", [False, True])
def test_devkit_layout_merges_both_halves(tmp_path, root_is_parent, test_annotations_in_devkit):
    directory = _make_devkit(tmp_path / "stanford_cars", test_annotations_in_devkit=test_annotations_in_devkit)
    records = read_dataset("cars", tmp_path if root_is_parent else directory)
    assert len(records) == 8
    assert _split_of(records) == EXPECTED_SPLITS
    root = directory.resolve()
    assert [r.path for r in records if r.label == "Make Model 99 2012"] == [
        str(root / "cars_train/00003.jpg"), str(root / "cars_test/00003.jpg"),
    ]  # fmt: skip
    assert all(Path(r.path).is_file() for r in records)


def test_no_layout_found(tmp_path):
    with pytest.raises(DatasetError, match="neither cars_annos.mat nor a devkit/ folder found") as info:
        read_dataset("cars", tmp_path)
    assert "car_ims/" in str(info.value) and "cars_train_annos.mat" in str(info.value)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("devkit/cars_meta.mat", "missing cars_meta.mat"),
        ("devkit/cars_train_annos.mat", "missing cars_train_annos.mat"),
        ("cars_test_annos_withlabels.mat", "missing cars_test_annos_withlabels.mat"),
        ("cars_test", "none of the first 4 images listed in .*cars_test_annos_withlabels.mat exist"),
    ],
)
def test_devkit_missing_parts(tmp_path, remove, message):
    directory = _make_devkit(tmp_path / "stanford_cars")
    target = directory / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError, match=message):
        read_dataset("cars", directory)


def test_unlabelled_test_annotations_are_named(tmp_path):
    directory = _make_devkit(tmp_path / "stanford_cars")
    (directory / "cars_test_annos_withlabels.mat").rename(directory / "devkit" / "cars_test_annos.mat")
    with pytest.raises(DatasetError, match="cars_test_annos.mat in devkit/ has no class labels"):
        read_dataset("cars", directory)


def test_original_layout_errors(tmp_path):
    directory = _make_original(tmp_path / "cars")
    shutil.rmtree(directory / "car_ims")
    with pytest.raises(DatasetError, match="cars_annos.mat exist .*image folder seems to be missing"):
        read_dataset("cars", directory)
    # one-element arrays, which loadmat squeezes to their element
    write_mat(directory / "cars_annos.mat", annotations=[{"relative_im_path": "car_ims/1.jpg", "class": np.uint8(150)}],
              class_names=CLASS_NAMES)  # fmt: skip
    with pytest.raises(DatasetError, match=r"annotation 1 \(car_ims/1.jpg\) has class 150, expected 1..100"):
        read_dataset("cars", directory)
    write_mat(directory / "cars_annos.mat", annotations=[{"fname": "1.jpg", "class": np.uint8(1)}], class_names=["x"])
    with pytest.raises(DatasetError, match="annotations lack field.* relative_im_path; fields: fname, class"):
        read_dataset("cars", directory)
    write_mat(directory / "cars_annos.mat", annotations=[{"relative_im_path": "a.jpg", "class": np.uint8(1)}])
    with pytest.raises(DatasetError, match="expected a cell array of strings 'class_names'; variables: annotations$"):
        read_dataset("cars", directory)
    write_mat(directory / "cars_annos.mat", class_names=CLASS_NAMES)
    with pytest.raises(DatasetError, match="expected a struct array 'annotations'; variables: class_names$"):
        read_dataset("cars", directory)


def test_one_image_of_one_class(tmp_path):
    """A 1×1 struct array and a 1×1 cell array come back from loadmat squeezed; they still read."""
    directory = tmp_path / "cars"
    _image(directory / "car_ims/000001.jpg")
    write_mat(
        directory / "cars_annos.mat",
        annotations=[{"relative_im_path": "car_ims/000001.jpg", "class": np.uint8(1)}],
        class_names=["Only Car 2012"],
    )
    [record] = read_dataset("cars", directory)
    assert (record.label, record.split) == ("Only Car 2012", "train")


@pytest.mark.parametrize("compress", [True, False])
def test_corrupt_mat_file_is_named(tmp_path, compress):
    directory = _make_devkit(tmp_path / "stanford_cars")
    annotations_file = directory / "devkit" / "cars_train_annos.mat"
    write_mat(
        annotations_file, annotations=[{**_bbox(), "class": np.uint8(1), "fname": "00001.jpg"}] * 3, compress=compress
    )
    annotations_file.write_bytes(annotations_file.read_bytes()[:-40])
    with pytest.raises(DatasetError, match=r"cars_train_annos.mat: cannot read this MAT-file, it may be corrupt"):
        read_dataset("cars", directory)
    annotations_file.write_text("annotations = struct('fname', {'00001.jpg'})\n")
    with pytest.raises(DatasetError, match=r"cars_train_annos.mat: cannot read this MAT-file"):
        read_dataset("cars", directory)


def test_matlab_v73_file_is_refused_by_name(tmp_path):
    directory = _make_devkit(tmp_path / "stanford_cars")
    meta_file = directory / "devkit" / "cars_meta.mat"
    # the header of an HDF5-based -v7.3 file: text, then version 0x0200 and the byte-order mark
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    meta_file.write_bytes(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM" + b"\0" * 384)
    with pytest.raises(DatasetError, match=r"cars_meta.mat: MATLAB -v7.3 \(HDF5\) files are not supported"):
        read_dataset("cars", directory)
