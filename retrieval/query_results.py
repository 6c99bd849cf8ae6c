"""Per-query evaluation results: what ``sct eval`` found for each query, saved next to eval.json.

One row per evaluated query (those with another gallery item of their label), in query order: its label,
the rank of its first correct result, R, its AP@R and R-precision, its top K gallery ids and scores; plus a
histogram of positive and negative pair similarities. Stored as an uncompressed ``.npz`` of plain arrays
(no pickle), read back with ``load_query_results``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from core.atomic import atomic_file

QUERY_RESULTS_FILE = "eval_queries.npz"

#: The per-row arrays [M]: key -> (dtype kinds accepted on load, dtype held)
_ROW_ARRAYS = {
    "query_item": ("iu", np.int64),
    "label": ("iu", np.int32),
    "first_correct_rank": ("iu", np.int32),
    "relevant": ("iu", np.int32),
    "ap_at_r": ("f", np.float32),
    "r_precision": ("f", np.float32),
}
#: The other arrays: key -> (dtype kinds accepted on load, dtype held, dimensions)
_OTHER_ARRAYS = {
    "query_path": ("S", np.bytes_, 1),
    "label_names": ("U", np.str_, 1),
    "top_ids": ("iu", np.int64, 2),
    "top_scores": ("f", np.float32, 2),
    "hist_edges": ("f", np.float64, 1),
    "hist_positive": ("iu", np.int64, 1),
    "hist_negative": ("iu", np.int64, 1),
}
#: The scalars: key -> (dtype kinds accepted on load, Python type held)
_SCALARS = {"depth": ("iu", int), "mode": ("U", str), "model_sha256": ("U", str), "hist_queries": ("iu", int)}
MODES = ("leave-one-out", "queries")


@dataclass(frozen=True, eq=False)
class QueryResults:
    """The per-query arrays of one evaluation (docs/DESIGN.md describes each key)."""

    query_item: np.ndarray  # int64 [M]: gallery id of the query (leave-one-out), -1 for external queries
    query_path: np.ndarray  # bytes [M] (queries mode) or [0] (leave-one-out): the query image path, UTF-8
    label: np.ndarray  # int32 [M]: index into label_names
    label_names: np.ndarray  # unicode [L]
    first_correct_rank: np.ndarray  # int32 [M]: 1-based; 0 = none within depth
    relevant: np.ndarray  # int32 [M]: R
    ap_at_r: np.ndarray  # float32 [M]
    r_precision: np.ndarray  # float32 [M]
    top_ids: np.ndarray  # int64 [M, K], -1 padding
    top_scores: np.ndarray  # float32 [M, K], NaN padding
    depth: int
    mode: str
    model_sha256: str
    hist_edges: np.ndarray  # float64 [B + 1]
    hist_positive: np.ndarray  # int64 [B]
    hist_negative: np.ndarray  # int64 [B]
    hist_queries: int

    def __post_init__(self) -> None:
        for name, (_, dtype) in _ROW_ARRAYS.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        for name, (_, dtype, _) in _OTHER_ARRAYS.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        for name, (_, kind) in _SCALARS.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        _check(self)

    def __len__(self) -> int:
        return len(self.query_item)

    def label_of(self, row: int) -> str:
        """The label of row ``row``'s query."""
        return str(self.label_names[self.label[row]])


@dataclass(frozen=True)
class ClassResult:
    """Recall@1 and MAP@R over the queries of one label."""

    label: str
    queries: int
    recall_at_1: float
    map_at_r: float


def _check(results: QueryResults) -> None:
    """Raise ValueError when the arrays do not fit together."""
    rows = len(results.query_item)
    for name in _ROW_ARRAYS:
        if getattr(results, name).shape != (rows,):
            raise ValueError(f"{name} has shape {getattr(results, name).shape}, expected ({rows},)")
    for name, (_, _, ndim) in _OTHER_ARRAYS.items():
        if getattr(results, name).ndim != ndim:
            raise ValueError(f"{name} has shape {getattr(results, name).shape}, expected {ndim} dimension(s)")
    if results.mode not in MODES:
        raise ValueError(f"mode is {results.mode!r}, expected one of {', '.join(MODES)}")
    paths = rows if results.mode == "queries" else 0
    if results.query_path.shape != (paths,):
        raise ValueError(f"query_path has shape {results.query_path.shape}, expected ({paths},) in {results.mode} mode")
    if results.top_ids.shape != results.top_scores.shape or len(results.top_ids) != rows:
        raise ValueError(
            f"top_ids {results.top_ids.shape} and top_scores {results.top_scores.shape} must both be [{rows}, K]"
        )
    if rows and not (0 <= results.label.min() and results.label.max() < len(results.label_names)):
        raise ValueError(f"label values must index label_names ({len(results.label_names)} names)")
    bins = len(results.hist_positive)
    if results.hist_negative.shape != (bins,) or results.hist_edges.shape != (bins + 1,):
        raise ValueError(
            f"hist_edges {results.hist_edges.shape}, hist_positive {results.hist_positive.shape} and "
            f"hist_negative {results.hist_negative.shape} must be [B + 1], [B] and [B]"
        )


def save_query_results(results: QueryResults, path: str | os.PathLike[str]) -> Path:
    """Write ``results`` to the file ``path`` atomically (for a gallery: ``directory / QUERY_RESULTS_FILE``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {field.name: getattr(results, field.name) for field in fields(results)}
    with atomic_file(path) as temporary, open(temporary, "xb") as file:  # a file object: savez adds no ".npz"
        np.savez(file, **arrays)
    return path


def load_query_results(directory: str | os.PathLike[str]) -> QueryResults | None:
    """The per-query results in gallery folder ``directory``; None when it has none.

    Raises ValueError naming the file when it is unreadable, lacks a key, or its arrays do not fit together;
    the message names the gallery folder, not its path, so a server can show it.
    """
    path = Path(directory) / QUERY_RESULTS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [field.name for field in fields(QueryResults) if field.name not in stored.files]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            values = {field.name: stored[field.name] for field in fields(QueryResults)}
        for name, value in values.items():
            _check_kind(name, value)
        return QueryResults(**values)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(
            f"{QUERY_RESULTS_FILE} of gallery {Path(directory).absolute().name!r} cannot be read: {reason}; "
            "run sct eval again"
        ) from error


def _check_kind(name: str, value: np.ndarray) -> None:
    kinds = (_ROW_ARRAYS.get(name) or _OTHER_ARRAYS.get(name) or _SCALARS[name])[0]
    if value.dtype.kind not in kinds:
        raise ValueError(f"{name} has dtype {value.dtype}")
    if name in _SCALARS and value.ndim != 0:
        raise ValueError(f"{name} has shape {value.shape}, expected a scalar")


def per_class(results: QueryResults) -> list[ClassResult]:
    """Recall@1 and MAP@R of each label that has queries, worst first: by Recall@1, then MAP@R, then label."""
    labels = len(results.label_names)
    queries = np.bincount(results.label, minlength=labels)
    correct = np.bincount(results.label, weights=results.first_correct_rank == 1, minlength=labels)
    average_precision = np.bincount(results.label, weights=results.ap_at_r.astype(np.float64), minlength=labels)
    classes = [
        ClassResult(
            str(results.label_names[code]),
            int(queries[code]),
            float(correct[code] / queries[code]),
            float(average_precision[code] / queries[code]),
        )
        for code in np.flatnonzero(queries)
    ]
    return sorted(classes, key=lambda c: (c.recall_at_1, c.map_at_r, c.label))


def failing_rows(results: QueryResults, label: str | None = None) -> np.ndarray:
    """Rows whose first result is wrong (first_correct_rank != 1), of label ``label`` only when given, in order.

    A label with no queries gives no rows.
    """
    failing = results.first_correct_rank != 1
    if label is not None:
        codes = np.flatnonzero(results.label_names == label)
        failing &= results.label == (codes[0] if len(codes) else -1)
    return np.flatnonzero(failing)
