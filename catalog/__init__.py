"""Dataset readers (records of path, label, split, chain) and robust image loading.

Shared by training and indexing; nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from catalog.fashion_mnist import read_fashion_mnist
from catalog.folder import read_folder
from catalog.images import ImageLoadError, decode_rgb, load_rgb
from catalog.records import DatasetError, ImageRecord, select_split, summarize

#: dataset name -> reader(root) -> records
DATASETS: dict[str, Callable[[Path], list[ImageRecord]]] = {
    "folder": read_folder,
    "fashion-mnist": read_fashion_mnist,
}


def read_dataset(name: str, root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Read the dataset ``name`` stored under ``root``."""
    try:
        reader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    return reader(Path(root))


__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageLoadError",
    "ImageRecord",
    "decode_rgb",
    "load_rgb",
    "read_dataset",
    "select_split",
    "summarize",
]
