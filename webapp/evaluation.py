"""A gallery's evaluation for the web page: eval.json (written by ``sct eval``) as table rows and a curve."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from retrieval.gallery import EVAL_FILE

_RECALL_KEY = re.compile(r"(?:(?P<prefix>\w+)_)?recall@(?P<k>\d+)")
_RATES = (("map@r", "MAP@R"), ("precision@1", "P@1"))
_COUNTS = (
    ("queries", "Queries"),
    ("skipped", "Skipped queries"),
    ("chain_queries", "Chain queries"),
    ("chain_skipped", "Chain queries skipped"),
)
_DETAILS = (("mode", "Mode"), ("faiss_factory", "FAISS factory"), ("created", "Evaluated"))
_CURVE_COLOURS = ("#3b5bdb", "#e8590c", "#2b8a3e", "#862e9c")  # the page's accent first
_FORMATS: dict[str, Callable[[Any], str]] = {
    "count": "{:,}".format,
    "recall_at_10_vs_exact": lambda value: f"{100 * value:.1f}%",
    "created": lambda value: str(value).replace("T", " ").replace("+00:00", " UTC"),
}
_MANIFEST_FACTS = (
    ("dataset", "Dataset"),
    ("split", "Split"),
    ("count", "Items"),
    ("embedding_dim", "Embedding dimension"),
    ("faiss_factory", "FAISS factory"),
    ("recall_at_10_vs_exact", "Recall@10 vs exact search"),
    ("created", "Built"),
)


#: The drawn Recall@K picture of each gallery folder, with the (inode, mtime_ns, size) of its eval.json.
_drawn_curves: dict[Path, tuple[tuple[int, int, int], bytes]] = {}


@dataclass(frozen=True)
class RecallCurve:
    name: str  # "" for the gallery's labels, else e.g. "chain" (Hotels-50K)
    points: list[tuple[int, float]]  # (K, recall) by increasing K


def read_eval(directory: Path) -> dict[str, Any] | None:
    """The gallery folder's eval.json; None when there is none, ValueError when it cannot be read."""
    path = directory / EVAL_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:  # its strerror, without the path: the message is shown to web clients
        raise ValueError(f"{EVAL_FILE} of gallery {directory.name!r} cannot be read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{EVAL_FILE} of gallery {directory.name!r} cannot be read: {exc}") from None
    if not isinstance(results, dict) or not recall_curves(results):
        raise ValueError(f"{EVAL_FILE} of gallery {directory.name!r} holds no recall@K values")
    return results


def recall_curves(results: dict[str, Any]) -> list[RecallCurve]:
    """Recall@K by label kind: the gallery's labels first, then others such as Hotels-50K chains."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in results.items():
        match = _RECALL_KEY.fullmatch(key)
        if match and isinstance(value, (int, float)):
            curves.setdefault(match["prefix"] or "", []).append((int(match["k"]), float(value)))
    return [RecallCurve(name, sorted(points)) for name, points in sorted(curves.items())]


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) of everything in eval.json besides Recall@K."""
    rows = [
        (label, f"{100 * results[key]:.2f}%") for key, label in _RATES if isinstance(results.get(key), (int, float))
    ]
    rows += [(label, f"{results[key]:,}") for key, label in _COUNTS if isinstance(results.get(key), int)]
    if isinstance(results.get("unreadable_queries"), list) and results["unreadable_queries"]:
        rows.append(("Unreadable query images", f"{len(results['unreadable_queries']):,}"))
    rows += [(label, _FORMATS.get(key, str)(results[key])) for key, label in _DETAILS if key in results]
    return rows


def manifest_rows(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) of the manifest entries worth showing (the model's sha256 is shown apart)."""
    return [(label, _FORMATS.get(key, str)(manifest[key])) for key, label in _MANIFEST_FACTS if key in manifest]


def recall_curve_png(directory: Path) -> bytes | None:
    """The Recall@K picture of the gallery folder's eval.json; None and ValueError as read_eval.

    Drawing it takes a quarter of a second of CPU, so each folder's picture is
    kept until its eval.json is another file or changed: by inode, mtime and
    size. A file replaced between the stat and the read is drawn again at the
    next request, as its stamp then differs from the one kept.
    """
    try:
        status = (directory / EVAL_FILE).stat()
    except FileNotFoundError:
        return None
    stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
    kept = _drawn_curves.get(directory)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    results = read_eval(directory)
    if results is None:
        return None
    png = _draw_recall_curve(results)
    _drawn_curves[directory] = (stamp, png)
    return png


def _draw_recall_curve(results: dict[str, Any]) -> bytes:
    """Recall@K against K (log scale when K spans a factor of 8 or more), one line per label kind."""
    figure = Figure(figsize=(6.4, 3.4), dpi=144, layout="constrained")
    axes = figure.add_subplot()
    ks = set()
    for curve, colour in zip(recall_curves(results), _CURVE_COLOURS):
        x = [k for k, _ in curve.points]
        y = [100 * recall for _, recall in curve.points]
        ks.update(x)
        label = f"{curve.name} Recall@K" if curve.name else "Recall@K"
        axes.plot(x, y, marker="o", linewidth=2, label=label, color=colour)
        for k, percent in zip(x, y):
            axes.annotate(
                f"{percent:.1f}", (k, percent), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
            )
    if max(ks) >= 8 * min(ks):
        axes.set_xscale("log")
    axes.xaxis.set_major_locator(FixedLocator(sorted(ks)))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter("{x:g}")
    axes.set_ylim(top=min(100, axes.get_ylim()[1] + 3))
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.grid(alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    if len(axes.lines) > 1:
        axes.legend(frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
