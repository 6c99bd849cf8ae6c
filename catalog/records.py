"""The record type every dataset reader returns, and small helpers over lists of records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.errors import UserError, UserValueError

#: Splits in the order they are reported; readers may only use these.
SPLITS = ("train", "test", "query", "gallery")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset."""

    path: str  # path of an image file
    label: str  # class name as shown to users, e.g. "Sandal"
    split: str  # "train" | "test" | "query" | "gallery"
    chain: str | None = None  # Hotels-50K chain id
    # Coarser category for people, e.g. the SOP super-class "bicycle_final" or In-shop's
    # "WOMEN/Dresses"; training and evaluation ignore it.
    group: str | None = None


class DatasetError(UserError, ValueError):
    """A dataset cannot be read: missing root or files, bad layout, bad split file."""


def select_split(records: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    """Return the records of one split, in their original order.

    Raises ValueError when no record has that split, naming the splits present,
    because an empty selection almost always means a typo or the wrong dataset.
    """
    records = list(records)
    selected = [record for record in records if record.split == split]
    if not selected:
        present = ", ".join(_ordered_splits({record.split for record in records})) or "none"
        raise UserValueError(f"no images in split {split!r}; splits present: {present}")
    return selected


def summarize(records: Sequence[ImageRecord]) -> str:
    """One line: total images and classes, then images / classes per split."""
    classes_per_split: dict[str, set[str]] = {}
    for record in records:
        classes_per_split.setdefault(record.split, set()).add(record.label)
    images_per_split = Counter(record.split for record in records)
    all_classes = {record.label for record in records}
    parts = [
        f"{split}: {images_per_split[split]:,} images / {len(classes_per_split[split]):,} classes"
        for split in _ordered_splits(images_per_split)
    ]
    head = f"{len(records):,} images, {len(all_classes):,} classes"
    return "; ".join([head, *parts])


def _ordered_splits(splits: Iterable[str]) -> list[str]:
    """Known splits in SPLITS order, then any others alphabetically."""
    splits = set(splits)
    return [s for s in SPLITS if s in splits] + sorted(splits - set(SPLITS))
