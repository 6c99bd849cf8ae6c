"""Dataset readers (records of path, label, split, chain), the registry of what each dataset is (catalog.registry:
splits, Recall@K table, training preset) and robust image loading.

Shared by training and indexing; nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from catalog.images import ImageLoadError, decode_rgb, load_rgb
from catalog.records import DatasetError, ImageRecord, select_split, summarize
from catalog.registry import CHAIN_LABELS, DEFAULT_KS, FALLBACK, REGISTRY, DatasetSpec, LabelSet, spec, spec_or_folder
from catalog.validation import VALIDATION_SPLIT, carve_validation

#: dataset name -> reader(root) -> records, as registered in catalog.registry
DATASETS: Mapping[str, Callable[[Path], list[ImageRecord]]] = MappingProxyType(
    {name: entry.reader for name, entry in REGISTRY.items()}
)


def recall_ks(name: str) -> tuple[int, ...]:
    """The Ks of dataset ``name``'s published Recall@K table, used by `sct eval` and by the training log; any
    other name (a folder of images) gets the folder's, DEFAULT_KS."""
    return spec_or_folder(name).recall_ks


def read_dataset(name: str, root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Read the dataset ``name`` stored under ``root``; ValueError naming the valid names for an unknown one."""
    return spec(name).reader(Path(root))


__all__ = [
    "CHAIN_LABELS",
    "DATASETS",
    "DEFAULT_KS",
    "FALLBACK",
    "REGISTRY",
    "DatasetError",
    "DatasetSpec",
    "ImageLoadError",
    "ImageRecord",
    "LabelSet",
    "VALIDATION_SPLIT",
    "carve_validation",
    "decode_rgb",
    "load_rgb",
    "read_dataset",
    "recall_ks",
    "select_split",
    "spec",
    "spec_or_folder",
    "summarize",
]
