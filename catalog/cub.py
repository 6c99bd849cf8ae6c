"""CUB-200-2011: the dataset's own index files, split by class as in metric learning.

Classes 1–100 are "train" and 101–200 "test" (the dataset's
``train_test_split.txt`` splits images within classes, for classification, and
is not used). The label is the class folder name, e.g.
"001.Black_footed_Albatross".
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.layout import dataset_dir, layout_error, parse_int, read_rows, require_file, require_images
from catalog.records import ImageRecord

NAME = "CUB-200-2011"
LAST_TRAIN_CLASS = 100
TREE = """
CUB_200_2011/                 (the data root, or its parent)
├── images.txt                <image_id> <class folder>/<file>.jpg
├── image_class_labels.txt    <image_id> <class_id 1..200>
├── classes.txt               <class_id> <class folder>   (optional)
└── images/
    └── 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...
"""


def read_cub(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of all 11,788 images; record paths are absolute."""
    directory = dataset_dir(root, "images.txt", ["CUB_200_2011"], NAME, TREE)
    images_file = directory / "images.txt"
    labels_file = require_file(directory / "image_class_labels.txt", NAME, TREE)
    classes_file = directory / "classes.txt"
    class_names = _class_names(classes_file) if classes_file.is_file() else None

    class_of_image = {
        image_id: parse_int(class_id, labels_file, line, "class id")
        for line, (image_id, class_id) in read_rows(labels_file, ("image_id", "class_id"))
    }
    records = []
    for line, (image_id, relative_path) in read_rows(images_file, ("image_id", "path")):
        class_id = class_of_image.get(image_id)
        if class_id is None:
            raise layout_error(
                NAME,
                f"image {image_id} ({relative_path}, {images_file} line {line}) " f"has no class in {labels_file.name}",
                TREE,
            )
        if class_names is None:
            label = Path(relative_path).parent.name or str(class_id)
        elif class_id in class_names:
            label = class_names[class_id]
        else:
            raise layout_error(NAME, f"class {class_id} of image {image_id} is not in {classes_file}", TREE)
        split = "train" if class_id <= LAST_TRAIN_CLASS else "test"
        records.append(ImageRecord(path=str(directory / "images" / relative_path), label=label, split=split))
    require_images(records, NAME, str(images_file), TREE)
    return records


def _class_names(classes_file: Path) -> dict[int, str]:
    return {
        parse_int(class_id, classes_file, line, "class id"): name
        for line, (class_id, name) in read_rows(classes_file, ("class_id", "name"))
    }
