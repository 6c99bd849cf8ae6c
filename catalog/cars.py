"""Cars196 (Stanford Cars), in its original layout or in the devkit layout torchvision uses.

Classes 1–98 are "train" and 99–196 "test", as in metric learning; the
annotations' own train/test flag (a split within classes, for classification)
is ignored, so the devkit's two halves are merged before splitting. The label
is the class name, e.g. "AM General Hummer SUV 2000".

The annotation files are MATLAB .mat files, read with ``scipy.io.loadmat``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from catalog.layout import layout_error, require_file, require_images
from catalog.records import DatasetError, ImageRecord

NAME = "Cars196"
LAST_TRAIN_CLASS = 98
ANNOTATIONS_FILE = "cars_annos.mat"
TEST_ANNOTATIONS_FILE = "cars_test_annos_withlabels.mat"
TREE = """
either the original layout:
  DATA_ROOT/
  ├── cars_annos.mat       annotations (relative_im_path, class 1..196, ...) and class_names
  └── car_ims/000001.jpg ...
or the devkit layout of torchvision's StanfordCars (DATA_ROOT may also be the folder above it):
  DATA_ROOT/stanford_cars/
  ├── devkit/
  │   ├── cars_meta.mat                class_names
  │   └── cars_train_annos.mat         annotations (fname, class, ...)
  ├── cars_test_annos_withlabels.mat   annotations (fname, class, ...)
  ├── cars_train/00001.jpg ...
  └── cars_test/00001.jpg ...
"""


def read_cars(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of all 16,185 images; record paths are absolute."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise layout_error(NAME, f"dataset root {root} does not exist or is not a directory", TREE)
    if (root / ANNOTATIONS_FILE).is_file():
        return _read_original(root)
    for directory in (root, root / "stanford_cars"):
        if (directory / "devkit").is_dir():
            return _read_devkit(directory)
    raise layout_error(NAME, f"neither {ANNOTATIONS_FILE} nor a devkit/ folder found in {root}", TREE)


def _read_original(directory: Path) -> list[ImageRecord]:
    annotations_file = directory / ANNOTATIONS_FILE
    variables = _read_mat(annotations_file)
    class_names = _class_names(variables, annotations_file)
    records = [
        _record(directory, "relative_im_path", annotation, class_names, annotations_file, i)
        for i, annotation in enumerate(_annotations(variables, annotations_file, "relative_im_path"))
    ]
    require_images(records, NAME, str(annotations_file), TREE)
    return records


def _read_devkit(directory: Path) -> list[ImageRecord]:
    devkit = directory / "devkit"
    meta_file = require_file(devkit / "cars_meta.mat", NAME, TREE)
    class_names = _class_names(_read_mat(meta_file), meta_file)
    halves = [
        (require_file(devkit / "cars_train_annos.mat", NAME, TREE), directory / "cars_train"),
        (_test_annotations_file(directory), directory / "cars_test"),
    ]
    records = []
    for annotations_file, image_dir in halves:
        half = [
            _record(image_dir, "fname", annotation, class_names, annotations_file, i)
            for i, annotation in enumerate(_annotations(_read_mat(annotations_file), annotations_file, "fname"))
        ]
        require_images(half, NAME, str(annotations_file), TREE)
        records += half
    return records


def _test_annotations_file(directory: Path) -> Path:
    """The test annotations with labels, next to devkit/ (torchvision) or inside it."""
    for candidate in (directory / TEST_ANNOTATIONS_FILE, directory / "devkit" / TEST_ANNOTATIONS_FILE):
        if candidate.is_file():
            return candidate
    unlabelled = directory / "devkit" / "cars_test_annos.mat"
    hint = f" ({unlabelled.name} in devkit/ has no class labels)" if unlabelled.is_file() else ""
    raise layout_error(NAME, f"missing {TEST_ANNOTATIONS_FILE} in {directory} or {directory / 'devkit'}{hint}", TREE)


def _read_mat(path: Path) -> dict[str, Any]:
    """The variables of a MAT-file, squeezed, with structs as dicts and cell arrays as lists or arrays."""
    try:
        return scipy.io.loadmat(path, simplify_cells=True)
    except NotImplementedError as error:  # scipy's answer to a -v7.3 (HDF5) file
        raise DatasetError(f"{path}: MATLAB -v7.3 (HDF5) files are not supported; re-save it with -v7") from error
    except Exception as error:  # a damaged file fails in many ways: MatReadError, ValueError, OSError, IndexError...
        raise DatasetError(f"{path}: cannot read this MAT-file, it may be corrupt or truncated ({error})") from error


def _as_list(value: Any) -> list[Any]:
    """The elements of a cell or struct array; loadmat squeezes a one-element array to its element."""
    if isinstance(value, np.ndarray):
        return value.ravel(order="F").tolist()
    return value if isinstance(value, list) else [value]


def _annotations(variables: dict[str, Any], path: Path, path_field: str) -> list[dict[str, Any]]:
    annotations = _as_list(variables.get("annotations"))
    if "annotations" not in variables or not all(isinstance(a, dict) for a in annotations):
        raise DatasetError(f"{path}: expected a struct array 'annotations'; variables: {_variable_names(variables)}")
    missing = [field for field in (path_field, "class") if annotations and field not in annotations[0]]
    if missing:
        raise DatasetError(
            f"{path}: annotations lack field(s) {', '.join(missing)}; fields: {', '.join(annotations[0])}"
        )
    return annotations


def _class_names(variables: dict[str, Any], path: Path) -> list[str]:
    names = _as_list(variables.get("class_names"))
    if "class_names" not in variables or not all(isinstance(name, str) for name in names):
        raise DatasetError(
            f"{path}: expected a cell array of strings 'class_names'; variables: {_variable_names(variables)}"
        )
    return [str(name) for name in names]


def _variable_names(variables: dict[str, Any]) -> str:
    return ", ".join(name for name in variables if not name.startswith("__"))  # not loadmat's __header__ etc.


def _record(
    image_dir: Path, path_field: str, annotation: dict[str, Any], class_names: list[str], path: Path, index: int
) -> ImageRecord:
    """The record of annotation ``index`` (0-based) of the annotations file ``path``."""
    name = annotation[path_field]
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{path}: annotation {index + 1} has no {path_field}")
    value = np.asarray(annotation["class"])
    class_id = int(value.item()) if value.size == 1 else 0
    if not 1 <= class_id <= len(class_names):
        raise DatasetError(
            f"{path}: annotation {index + 1} ({name}) has class {value.tolist()}, expected 1..{len(class_names)}"
        )
    split = "train" if class_id <= LAST_TRAIN_CLASS else "test"
    return ImageRecord(path=str(image_dir / name), label=class_names[class_id - 1], split=split)
