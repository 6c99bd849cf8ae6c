"""Search filters: which gallery items a search may return (by label, by id), as the item ids they allow.

A filter is resolved against a gallery's item table into the sorted array of the ids it allows
(``allowed_ids``, vectorised over the label codes and ids: a million items take milliseconds).
``retrieval.gallery.Gallery.search`` then searches only those: exactly, over their stored vectors, when
they are few and the index approximate, else through a FAISS ``IDSelectorBitmap`` inside the index's own search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserValueError
from retrieval.items import ItemTable


@dataclass(frozen=True)
class SearchFilter:
    """Items a search may return: all of these conditions hold (None or empty: no condition).

    ``labels``: only items with one of these labels; ``exclude_labels``: no item with one of these;
    ``ids``: only these item ids; ``id_range``: only ids in [start, stop)."""

    labels: frozenset[str] | None = None
    exclude_labels: frozenset[str] = frozenset()
    ids: np.ndarray | None = None
    id_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.id_range is not None and not 0 <= self.id_range[0] <= self.id_range[1]:
            raise UserValueError(f"an id range START-STOP needs 0 <= START <= STOP, got {self.id_range}")

    @property
    def empty(self) -> bool:
        """Whether the filter allows every item."""
        return self.labels is None and not self.exclude_labels and self.ids is None and self.id_range is None

    def describe(self) -> str:
        """The conditions in words, for messages and logs."""
        parts = []
        if self.labels is not None:
            parts.append(f"label in {sorted(self.labels)}")
        if self.exclude_labels:
            parts.append(f"label not in {sorted(self.exclude_labels)}")
        if self.ids is not None:
            parts.append(f"{len(self.ids)} listed id(s)")
        if self.id_range is not None:
            parts.append(f"id in [{self.id_range[0]}, {self.id_range[1]})")
        return " and ".join(parts) or "no filter"


def allowed_ids(table: ItemTable, search_filter: SearchFilter) -> np.ndarray:
    """The ids of the items of ``table`` that ``search_filter`` allows, ascending (int64)."""
    keep = np.ones(len(table), dtype=bool)
    labels, codes = table.label_codes()
    if search_filter.labels is not None:
        keep &= _label_mask(labels, search_filter.labels)[codes]
    if search_filter.exclude_labels:
        keep &= ~_label_mask(labels, search_filter.exclude_labels)[codes]
    ids = table.ids
    if search_filter.id_range is not None:
        start, stop = search_filter.id_range
        keep &= (ids >= start) & (ids < stop)
    if search_filter.ids is not None:
        keep &= np.isin(ids, np.asarray(search_filter.ids, dtype=np.int64))
    return ids[keep]


def _label_mask(labels: tuple[str, ...], chosen: frozenset[str]) -> np.ndarray:
    """For each distinct label (by code), whether it is one of ``chosen``."""
    return np.fromiter((label in chosen for label in labels), dtype=bool, count=len(labels))


def parse_id_list(raw: str) -> np.ndarray:
    """Item ids written as "3,17,42" (spaces allowed), as an int64 array; UserValueError naming a bad entry."""
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    bad = next((entry for entry in entries if not (entry.isascii() and entry.isdigit() and len(entry) <= 18)), None)
    if bad is not None or not entries:
        raise UserValueError(f"ids must be item ids (whole numbers) separated by commas, got {raw[:100]!r}")
    return np.array(sorted({int(entry) for entry in entries}), dtype=np.int64)


def parse_id_range(raw: str) -> tuple[int, int]:
    """An id range written "START-STOP" (STOP excluded); UserValueError unless 0 <= START <= STOP."""
    start, dash, stop = raw.strip().partition("-")
    if not dash or not all(part.isascii() and part.isdigit() and len(part) <= 18 for part in (start, stop)):
        raise UserValueError(f"an id range must be START-STOP with whole numbers (STOP excluded), got {raw[:100]!r}")
    if int(start) > int(stop):
        raise UserValueError(f"an id range START-STOP needs START <= STOP, got {raw[:100]!r}")
    return int(start), int(stop)
