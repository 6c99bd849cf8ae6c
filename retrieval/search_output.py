"""``sct search``'s results: each query's ranked items, printed as tables or written to a file, CSV (a row per
query and rank) or JSON Lines (an object per query)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_text
from core.errors import UserValueError
from retrieval.columns import format_columns
from retrieval.gallery import Gallery

FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class Hit:
    """One result of a query: its rank (from 1), score, and the item's id, label and path as in items.csv."""

    rank: int
    score: float
    id: int
    label: str
    path: str


COLUMNS = ("query", *Hit.__dataclass_fields__)


def ranked(gallery: Gallery, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """A query's results from its row of ``gallery.search``'s scores and ids (the -1 padding left out)."""
    hits = []
    for score, item_id in zip(scores.tolist(), ids.tolist()):
        if item_id >= 0:  # FAISS pads with -1 when it finds fewer than k (an approximate index, a filter)
            item = gallery.item(item_id)
            hits.append(Hit(len(hits) + 1, score, item_id, item.label, item.path))
    return hits


def output_format(path: str | os.PathLike[str], given: str | None) -> str:
    """``given``, else the format named by the extension of ``path`` (.csv or .jsonl)."""
    if given:
        return given
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UserValueError(
            f"cannot tell the format of {path} from its extension: name it .csv or .jsonl, or give --format"
        )
    return suffix


def write_results(
    path: str | os.PathLike[str], fmt: str, queries: Sequence[str], results: Sequence[Sequence[Hit]]
) -> None:
    """Write each query's results to ``path`` atomically, as ``fmt`` (one of FORMATS)."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((query, *asdict(hit).values()) for query, hits in zip(queries, results) for hit in hits)
        text = buffer.getvalue()
    else:
        text = "".join(
            json.dumps({"query": query, "results": [asdict(hit) for hit in hits]}) + "\n"
            for query, hits in zip(queries, results)
        )
    atomic_write_text(path, text)


def print_results(queries: Sequence[str], results: Sequence[Sequence[Hit]]) -> None:
    """Each query's results as a table on stdout."""
    for query, hits in zip(queries, results):
        rows = [(hit.rank, f"{hit.score:.4f}", hit.label, hit.id, hit.path) for hit in hits]
        print(f"query: {query}")
        print(format_columns(("rank", "score", "label", "id", "path"), rows, (True, True, False, True, False)))
        print()
