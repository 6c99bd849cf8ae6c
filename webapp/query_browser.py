"""A gallery's per-query evaluation (eval_queries.npz, written by ``sct eval``) as the evaluation browser reads it.

The file is loaded once per version, by (inode, mtime, size) as the recall curve
is drawn (webapp.evaluation), and what every page needs of it is computed then,
in linear time: the classes worst first, the rows that fail at Recall@1, and
those rows grouped by class. A page then reads only the rows it shows.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.query_results import (
    QUERY_RESULTS_FILE,
    ClassResult,
    QueryResults,
    failing_rows,
    load_query_results,
    per_class,
)
from webapp.errors import ApiError
from webapp.similarity_plot import similarity_histogram_png

Runner = Callable[..., Any]

#: The loaded file of each gallery folder, with the (inode, mtime_ns, size) it was loaded at.
_loaded: dict[Path, tuple[tuple[int, int, int], LoadedQueries]] = {}
_loading = threading.Lock()  # one request loads a (possibly large) file; the others wait for it


@dataclass(frozen=True, eq=False)
class LoadedQueries:
    """One version of a gallery's eval_queries.npz, with the summaries its pages use."""

    results: QueryResults
    classes: list[ClassResult]  # worst first (retrieval.query_results.per_class)
    failing: np.ndarray  # rows with first_correct_rank != 1, in row order
    failing_by_label: np.ndarray  # the same rows ordered by label code, then row
    label_starts: np.ndarray  # [L + 1]: label code c's failing rows are failing_by_label[starts[c]:starts[c + 1]]
    label_codes: dict[str, int]  # label → its index in results.label_names

    @classmethod
    def of(cls, results: QueryResults) -> LoadedQueries:
        failing = failing_rows(results)
        codes = results.label[failing]
        by_label = failing[np.argsort(codes, kind="stable")]
        starts = np.searchsorted(np.sort(codes), np.arange(len(results.label_names) + 1))
        return cls(
            results=results,
            classes=per_class(results),
            failing=failing,
            failing_by_label=by_label,
            label_starts=starts,
            label_codes={str(name): code for code, name in enumerate(results.label_names)},
        )

    def failing_of(self, label: str | None) -> np.ndarray:
        """The failing rows, of class ``label`` only when given, in row order; KeyError for an unknown label."""
        if label is None:
            return self.failing
        code = self.label_codes[label]
        return self.failing_by_label[self.label_starts[code] : self.label_starts[code + 1]]

    @functools.cached_property
    def classes_by_label(self) -> dict[str, ClassResult]:
        return {result.label: result for result in self.classes}

    @functools.cached_property
    def histogram_png(self) -> bytes:
        """The similarity histogram, drawn on first use (in a compute slot: see ``histogram_png``)."""
        return similarity_histogram_png(self.results)


def loaded_queries(directory: Path, name: str, run: Runner) -> LoadedQueries | None:
    """The per-query results of gallery ``name`` in ``directory``: None when it has no eval_queries.npz;
    ApiError 404, with a message that names no server path, when the file cannot be read. ``run`` runs the load
    (webapp.compute's ``run``: it is CPU and disk work)."""
    path = directory / QUERY_RESULTS_FILE
    kept = _loaded.get(directory)
    stamp = _stamp(path)
    if stamp is None:
        _loaded.pop(directory, None)
        return None
    if kept is not None and kept[0] == stamp:
        return kept[1]
    with _loading:
        kept = _loaded.get(directory)  # loaded by another request while this one waited
        if kept is not None and kept[0] == stamp:
            return kept[1]
        try:
            loaded = run(_load, directory)
        except ValueError as exc:
            raise ApiError(404, unreadable(name, exc)) from None
        if loaded is not None:
            _loaded[directory] = (stamp, loaded)  # a file replaced meanwhile has another stamp: loaded again next time
        return loaded


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def _load(directory: Path) -> LoadedQueries | None:
    results = load_query_results(directory)
    return None if results is None else LoadedQueries.of(results)


def unreadable(name: str, error: ValueError) -> str:
    """The message for an unreadable file: its cause, without the path (the message is shown to web clients)."""
    cause = error.__cause__ if error.__cause__ is not None else error
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return f"{QUERY_RESULTS_FILE} of gallery {name!r} cannot be read ({reason}); run `sct eval --index DIR` again"


def stale_message(name: str, loaded: LoadedQueries, model_sha256: str) -> str | None:
    """Why the file does not describe the gallery as served now (another model), or None when it does."""
    if loaded.results.model_sha256 == model_sha256:
        return None
    return (
        f"The per-query results ({QUERY_RESULTS_FILE}) were computed with model {loaded.results.model_sha256[:12]}, "
        f"but gallery {name} now uses model {model_sha256[:12]}: run `sct eval --index DIR` on its folder again."
    )


def histogram_png(loaded: LoadedQueries) -> bytes:
    """``loaded.histogram_png``, as a function for webapp.compute's ``run``."""
    return loaded.histogram_png
