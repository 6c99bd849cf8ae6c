"""Stanford Online Products: ``Ebay_train.txt`` is "train", ``Ebay_test.txt`` is "test".

The label is the product (class) id, e.g. "11318"; the super-class folder,
e.g. "bicycle_final", becomes the record's ``group``.
"""

from __future__ import annotations

import os

from catalog.layout import dataset_dir, read_rows, require_file, require_images
from catalog.records import DatasetError, ImageRecord

NAME = "Stanford Online Products"
SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
COLUMNS = ("image_id", "class_id", "super_class_id", "path")
TREE = """
Stanford_Online_Products/     (the data root, or its parent)
├── Ebay_train.txt            image_id class_id super_class_id path   (header, then one line per image)
├── Ebay_test.txt             same columns
├── bicycle_final/111085122871_0.JPG ...
└── ... (12 super-class folders)
"""


def read_sop(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of the 59,551 train and 60,502 test images; record paths are absolute."""
    directory = dataset_dir(root, SPLIT_FILES["train"], ["Stanford_Online_Products"], NAME, TREE)
    records = []
    for split, file_name in SPLIT_FILES.items():
        split_file = require_file(directory / file_name, NAME, TREE)
        rows = read_rows(split_file, COLUMNS)
        header = next(rows, (1, []))[1]
        if tuple(header) != COLUMNS:
            raise DatasetError(
                f"{split_file}, line 1: expected the header {' '.join(COLUMNS)!r}, got {' '.join(header)!r}"
            )
        split_records = [
            ImageRecord(path=str(directory / path), label=class_id, split=split, group=path.split("/", 1)[0])
            for _, (_, class_id, _, path) in rows
        ]
        require_images(split_records, NAME, str(split_file), TREE)
        records += split_records
    return records
