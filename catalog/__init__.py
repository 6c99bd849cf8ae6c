"""Dataset readers (records of path, label, split, chain) and robust image loading.

Shared by training and indexing; nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from catalog.cars import read_cars
from catalog.cub import read_cub
from catalog.fashion_mnist import read_fashion_mnist
from catalog.folder import read_folder
from catalog.hotels50k import read_hotels50k
from catalog.images import ImageLoadError, decode_rgb, load_rgb
from catalog.inshop import read_inshop
from catalog.records import DatasetError, ImageRecord, select_split, summarize
from catalog.sop import read_sop
from catalog.validation import VALIDATION_SPLIT, carve_validation

#: dataset name -> reader(root) -> records; the names are also the keys of training.config.DATASET_DEFAULTS
DATASETS: dict[str, Callable[[Path], list[ImageRecord]]] = {
    "cub": read_cub,
    "cars": read_cars,
    "sop": read_sop,
    "inshop": read_inshop,
    "hotels50k": read_hotels50k,
    "folder": read_folder,
    "fashion-mnist": read_fashion_mnist,
}

#: The K of each dataset's published Recall@K table, used by `sct eval` and by the training log; DEFAULT_KS elsewhere.
DATASET_KS: dict[str, tuple[int, ...]] = {"inshop": (1, 10, 20, 30, 40), "hotels50k": (1, 10, 100)}
DEFAULT_KS = (1, 2, 4, 8)


def recall_ks(name: str) -> tuple[int, ...]:
    """The Ks at which dataset ``name`` is reported; any other name (a folder of images) gets DEFAULT_KS."""
    return DATASET_KS.get(name, DEFAULT_KS)


def read_dataset(name: str, root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Read the dataset ``name`` stored under ``root``."""
    try:
        reader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    return reader(Path(root))


__all__ = [
    "DATASETS",
    "DATASET_KS",
    "DEFAULT_KS",
    "DatasetError",
    "ImageLoadError",
    "ImageRecord",
    "VALIDATION_SPLIT",
    "carve_validation",
    "decode_rgb",
    "load_rgb",
    "read_dataset",
    "recall_ks",
    "select_split",
    "summarize",
]
