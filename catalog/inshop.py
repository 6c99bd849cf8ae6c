"""In-shop Clothes Retrieval (DeepFashion): splits "train", "query" and "gallery" from ``list_eval_partition.txt``.

The label is the item id, e.g. "id_00000001"; the category folders, e.g.
"WOMEN/Dresses", become the record's ``group``. Both the flat layout most
metric-learning code uses and the layout of the official download
(``Eval/list_eval_partition.txt``, ``Img/img/``) are accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.layout import dataset_dir, layout_error, parse_int, read_rows, require_images
from catalog.records import DatasetError, ImageRecord

NAME = "In-shop Clothes Retrieval"
PARTITION_FILE = "list_eval_partition.txt"
COLUMNS = ("image_name", "item_id", "evaluation_status")
SPLITS = ("train", "query", "gallery")
TREE = """
DATA_ROOT/
├── list_eval_partition.txt   line 1: image count; line 2: image_name item_id evaluation_status;
│                             then e.g. img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train
└── img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...
(or the official download's Eval/list_eval_partition.txt and Img/img/...)
"""


def read_inshop(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of the 52,712 images (25,882 train, 14,218 query, 12,612 gallery); paths are absolute."""
    partition_file = dataset_dir(root, PARTITION_FILE, ["Eval"], NAME, TREE) / PARTITION_FILE
    root = Path(root).resolve()
    # image names start with "img/": they are relative to the folder holding img/
    image_base = next((base for base in (root, root / "Img") if (base / "img").is_dir()), root)
    with partition_file.open(encoding="utf-8") as file:
        count_line, header = file.readline().split(), file.readline().split()
    if len(count_line) != 1 or tuple(header) != COLUMNS:
        raise layout_error(
            NAME, f"{partition_file} should start with the image count, then the header " f"{' '.join(COLUMNS)!r}", TREE
        )
    expected = parse_int(count_line[0], partition_file, 1, "image count")
    records = [
        _record(image_base, partition_file, line, fields) for line, fields in read_rows(partition_file, COLUMNS, skip=2)
    ]
    if len(records) != expected:
        raise DatasetError(f"{partition_file}: lists {len(records)} images but its first line says {expected}")
    require_images(records, NAME, str(partition_file), TREE)
    return records


def _record(image_base: Path, partition_file: Path, line: int, fields: list[str]) -> ImageRecord:
    image_name, item_id, split = fields
    if split not in SPLITS:
        raise DatasetError(
            f"{partition_file}, line {line}: evaluation_status {split!r} is not one of {', '.join(SPLITS)}"
        )
    category = image_name.split("/")[1:-2]  # img/<gender>/<category>/<item>/<file>
    return ImageRecord(path=str(image_base / image_name), label=item_id, split=split, group="/".join(category) or None)
