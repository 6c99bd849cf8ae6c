"""Hotels-50K: training images are "train" (also the gallery), unoccluded test images are "query".

The label is the hotel id and ``chain`` the chain id, both as in the dataset's
files (hotels of no major chain keep the dataset's own chain id for that).

The layout is the one the dataset's repository produces: its
``download_train.py`` writes ``images/train/<chain_id>/<hotel_id>/<source>/<image_id>.<ext>``
and its ``test.tar.gz`` unpacks into ``images/test/`` in the same structure.
Training records come from ``input/dataset/train_set.csv`` and
``hotel_info.csv`` when those are present (fast, and independent of which
downloads succeeded); otherwise from scanning ``images/train``. Query records
always come from scanning ``images/test/unoccluded``. A scan takes the first
two folder levels below the split folder as chain and hotel, and every image
below them, so a layout without the ``<source>`` level is read as well.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from catalog.folder import image_files, subfolders
from catalog.layout import layout_error, require_images
from catalog.records import DatasetError, ImageRecord

NAME = "Hotels-50K"
TRAIN_DIR = Path("images", "train")
QUERY_DIR = Path("images", "test", "unoccluded")
CSV_DIR = Path("input", "dataset")
TREE = """
DATA_ROOT/                               (a clone of the Hotels-50K repository)
├── input/dataset/                       (optional; from input/dataset.tar.gz)
│   ├── hotel_info.csv                   hotel_id,hotel_name,chain_id,latitude,longitude
│   └── train_set.csv                    image_id,hotel_id,image_url,image_source,upload_timestamp
└── images/
    ├── train/<chain_id>/<hotel_id>/<source>/<image_id>.jpg    (written by download_train.py)
    └── test/unoccluded/<chain_id>/<hotel_id>/<source>/<image_id>.jpg   (from test.tar.gz)
"""


def read_hotels50k(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records of the training images (split "train") and the unoccluded test images (split "query")."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise layout_error(NAME, f"dataset root {root} does not exist or is not a directory", TREE)
    train_csv, hotel_csv = root / CSV_DIR / "train_set.csv", root / CSV_DIR / "hotel_info.csv"
    if train_csv.is_file() and hotel_csv.is_file():
        train = _read_train_csv(root, train_csv, _chain_of_hotels(hotel_csv))
        require_images(train, NAME, str(train_csv), TREE)
    else:
        train = _scan(root / TRAIN_DIR, "train")
    return train + _scan(root / QUERY_DIR, "query")


def _chain_of_hotels(hotel_csv: Path) -> dict[str, str]:
    """hotel id -> chain id, from hotel_info.csv (columns 1 and 3, as the dataset's own scripts read them)."""
    with hotel_csv.open(newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        next(rows, None)  # header
        chains = {}
        for row in rows:
            if len(row) < 3:
                raise DatasetError(f"{hotel_csv}, line {rows.line_num}: expected hotel_id,hotel_name,chain_id,...")
            chains[row[0]] = row[2]
    return chains


def _read_train_csv(root: Path, train_csv: Path, chain_of: dict[str, str]) -> list[ImageRecord]:
    """One record per row, at the path download_train.py saves it to (extension taken from the URL)."""
    records = []
    train_dir = root / TRAIN_DIR
    with train_csv.open(newline="", encoding="utf-8") as file:
        rows = csv.reader(file)
        next(rows, None)  # header
        for row in rows:
            if len(row) < 4:
                raise DatasetError(
                    f"{train_csv}, line {rows.line_num}: expected image_id,hotel_id,image_url," f"image_source,..."
                )
            image_id, hotel, url, source = row[:4]
            chain = chain_of.get(hotel)
            if chain is None:
                raise DatasetError(f"{train_csv}, line {rows.line_num}: hotel {hotel} is not in hotel_info.csv")
            # string formatting rather than Path joins: this runs a million times per read
            path = f"{train_dir}{os.sep}{chain}{os.sep}{hotel}{os.sep}{source}{os.sep}{image_id}.{url.split('.')[-1]}"
            records.append(ImageRecord(path=path, label=hotel, split="train", chain=chain))
    return records


def _scan(split_dir: Path, split: str) -> list[ImageRecord]:
    """Records of every image in ``split_dir/<chain_id>/<hotel_id>/**``."""
    if not split_dir.is_dir():
        raise layout_error(NAME, f"missing folder {split_dir}", TREE)
    records = [
        ImageRecord(path=str(path), label=hotel_dir.name, split=split, chain=chain_dir.name)
        for chain_dir in subfolders(split_dir)
        for hotel_dir in subfolders(chain_dir)
        for path in image_files(hotel_dir)
    ]
    if not records:
        raise layout_error(NAME, f"no images found in {split_dir}/<chain_id>/<hotel_id>/", TREE)
    return records
