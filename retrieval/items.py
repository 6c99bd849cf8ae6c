"""A gallery's items (items.csv): what each FAISS id is, held compactly for galleries of millions.

``ItemTable`` is a read-only sequence of ``GalleryItem`` that keeps columns, not
objects: the ids, the paths in one UTF-8 buffer with their end offsets, and the
labels and chains as integer codes into their distinct values. A million
Hotels-50K-like rows take about 102 MiB of resident memory this way, against 197 MiB
as a list of ``GalleryItem`` (benchmarks/item_table.py), and every server worker
holds one. Rows are in ascending id order, so an id is found by binary search.
"""

from __future__ import annotations

import array
import csv
import io
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError

ITEMS_FILE = "items.csv"


@dataclass(frozen=True, slots=True)  # slots: building a gallery of millions lists millions of these
class GalleryItem:
    """One indexed image; ``id`` is its FAISS id. A new gallery numbers its items 0..N-1 in row order; ids stay
    with their items when others are removed (``sct index --remove``) and are never reused."""

    id: int
    path: str
    label: str
    chain: str | None = None


class GalleryMismatchError(UserError, ValueError):
    """The files of a gallery folder disagree with each other."""


class ItemTable(Sequence):
    """Items in columns, in ascending id order; ``table[i]`` builds the ``GalleryItem`` of row i when asked."""

    def __init__(
        self,
        ids: np.ndarray,
        paths: bytes,
        ends: np.ndarray,
        labels: Sequence[str],
        label_codes: np.ndarray,
        chains: Sequence[str],
        chain_codes: np.ndarray | None,
    ) -> None:
        self._ids = ids  # int64, strictly ascending
        self._paths, self._ends = paths, ends  # path i is paths[ends[i-1]:ends[i]]
        self._labels, self._label_codes = tuple(labels), label_codes
        self._chains, self._chain_codes = tuple(chains), chain_codes  # code −1: no chain

    @classmethod
    def from_items(cls, items: Iterable[GalleryItem]) -> ItemTable:
        """The table of ``items``, whose ids must ascend."""
        builder = _Builder(with_chains=True)
        for row, item in enumerate(items):
            if builder.ids and item.id <= builder.ids[-1] or item.id < 0:
                raise ValueError(f"item ids must be at least 0 and ascend; row {row} has id {item.id}")
            builder.add(item.id, item.path, item.label, item.chain)
        return builder.table()

    @classmethod
    def read(cls, path: Path) -> ItemTable:
        """The rows of items.csv, checked (header, field count, ids ascending)."""
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, [])
            if header not in (["id", "path", "label"], ["id", "path", "label", "chain"]):
                raise GalleryMismatchError(f"{ITEMS_FILE} header must be id,path,label[,chain], got {','.join(header)}")
            builder = _Builder(with_chains=len(header) == 4)
            previous = -1
            for row_number, row in enumerate(reader):
                item_id = int(row[0]) if len(row) == len(header) and row[0].isascii() and row[0].isdigit() else -1
                if item_id <= previous:
                    raise GalleryMismatchError(
                        f"{ITEMS_FILE} line {row_number + 2} must have {len(header)} fields starting with an id "
                        f"above {previous} (ids ascend), got {row}"
                    )
                builder.add(item_id, row[1], row[2], (row[3] or None) if len(row) == 4 else None)
                previous = item_id
        return builder.table()

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = operator.index(index)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        start = int(self._ends[row - 1]) if row else 0
        chain = None
        if self._chain_codes is not None and self._chain_codes[row] >= 0:
            chain = self._chains[self._chain_codes[row]]
        return GalleryItem(
            int(self._ids[row]),
            self._paths[start : int(self._ends[row])].decode("utf-8"),
            self._labels[self._label_codes[row]],
            chain,
        )

    def __iter__(self) -> Iterator[GalleryItem]:
        return (self[row] for row in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-looking sequences compare by value

    @property
    def ids(self) -> np.ndarray:
        """Every row's item id, ascending (int64, read-only)."""
        return self._ids

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The row of each of ``item_ids`` (int64), −1 where the table has no such item."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        rows = np.searchsorted(self._ids, item_ids)
        found = rows < len(self._ids)
        found[found] = self._ids[rows[found]] == item_ids[found]
        return np.where(found, rows, -1)

    def row_of(self, item_id: int) -> int | None:
        """The row of the item with id ``item_id``, or None when the table has no such item."""
        row = int(self.rows_of(np.array([item_id]))[0]) if -(2**63) <= item_id < 2**63 else -1
        return None if row < 0 else row

    @property
    def dense(self) -> bool:
        """Whether the ids are the rows 0..N-1 (a gallery nothing was removed from)."""
        return not len(self._ids) or int(self._ids[-1]) == len(self._ids) - 1

    def label_codes(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The distinct labels and every row's index into them (int32): what filters by label compare."""
        return self._labels, self._label_codes

    def label_array(self) -> np.ndarray:
        """Every row's label, as a numpy str array."""
        return np.array(self._labels, dtype=str)[self._label_codes]

    def chain_array(self) -> np.ndarray | None:
        """Every row's chain, or None unless every row has one."""
        if self._chain_codes is None or not len(self) or (self._chain_codes < 0).any():
            return None
        return np.array(self._chains, dtype=str)[self._chain_codes]

    def nbytes(self) -> int:
        """The bytes the columns hold (the distinct labels and chains not counted)."""
        codes = self._chain_codes.nbytes if self._chain_codes is not None else 0
        return len(self._paths) + self._ids.nbytes + self._ends.nbytes + self._label_codes.nbytes + codes


class _Builder:
    """Appends rows to growable typed arrays (8 + 8 + 4 + 4 bytes a row plus the path), then freezes them."""

    def __init__(self, *, with_chains: bool) -> None:
        self.ids = array.array("q")
        self.paths = bytearray()
        self.ends = array.array("q")
        self.labels: dict[str, int] = {}
        self.label_codes = array.array("i")
        self.chains: dict[str, int] = {}
        self.chain_codes = array.array("i") if with_chains else None

    def add(self, item_id: int, path: str, label: str, chain: str | None) -> None:
        self.ids.append(item_id)
        self.paths += path.encode("utf-8")
        self.ends.append(len(self.paths))
        self.label_codes.append(self.labels.setdefault(label, len(self.labels)))
        if chain is not None and self.chain_codes is None:  # a chain after chainless rows
            self.chain_codes = array.array("i", [-1] * (len(self.ends) - 1))
        if self.chain_codes is not None:
            self.chain_codes.append(-1 if chain is None else self.chains.setdefault(chain, len(self.chains)))

    def table(self) -> ItemTable:
        chain_codes = np.frombuffer(self.chain_codes, dtype=np.int32) if self.chain_codes is not None else None
        return ItemTable(
            np.frombuffer(self.ids, dtype=np.int64),
            bytes(self.paths),
            np.frombuffer(self.ends, dtype=np.int64),
            list(self.labels),
            np.frombuffer(self.label_codes, dtype=np.int32),
            list(self.chains),
            chain_codes,
        )


def read_items(path: Path) -> ItemTable:
    """The checked rows of items.csv (``ItemTable.read``)."""
    return ItemTable.read(path)


def write_items(path: Path, items: Sequence[GalleryItem]) -> None:
    """Write items.csv: id,path,label, and chain when any item has one."""
    path.write_text(_items_csv(items), encoding="utf-8")


def _items_csv(items: Sequence[GalleryItem]) -> str:
    with_chain = any(item.chain is not None for item in items)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "path", "label", "chain"] if with_chain else ["id", "path", "label"])
    for item in items:
        row = [item.id, item.path, item.label]
        writer.writerow([*row, item.chain or ""] if with_chain else row)
    return buffer.getvalue()
