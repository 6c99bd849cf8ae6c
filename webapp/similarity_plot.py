"""The similarity histogram of an evaluation: how the cosines of same-label and different-label pairs spread.

Drawn from the ``hist_*`` arrays of eval_queries.npz, each kind as its share of
its own pairs (different-label pairs outnumber the others by orders of
magnitude), over the range where there are any.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from retrieval.query_results import QueryResults

_POSITIVE, _NEGATIVE = "#2b8a3e", "#c92a2a"


def similarity_histogram_png(results: QueryResults) -> bytes:
    """The histogram as a PNG (a quarter of a second of CPU: cache it; see webapp.query_browser)."""
    figure = Figure(figsize=(6.4, 3.0), dpi=144, layout="constrained")
    axes = figure.add_subplot()
    edges = results.hist_edges
    used = np.flatnonzero(results.hist_positive + results.hist_negative)
    for counts, colour, kind in (
        (results.hist_negative, _NEGATIVE, "different labels"),
        (results.hist_positive, _POSITIVE, "same label"),
    ):
        total = int(counts.sum())
        if total:
            share = 100 * counts / total
            axes.stairs(share, edges, fill=True, alpha=0.35, color=colour)
            axes.stairs(share, edges, color=colour, linewidth=1.5, label=f"{kind} ({total:,} pairs)")
    if len(used):
        low, high = edges[used[0]], edges[used[-1] + 1]
        margin = 0.05 * (high - low)
        axes.set_xlim(max(edges[0], low - margin), min(edges[-1], high + margin))
        axes.legend(frameon=False, fontsize=8)
    else:
        axes.text(0.5, 0.5, "no pairs", transform=axes.transAxes, ha="center", va="center", color="#5d6677")
    axes.set_xlabel(f"cosine similarity (pairs of {results.hist_queries:,} queries with the gallery)")
    axes.set_ylabel("share of pairs (%)")
    axes.grid(alpha=0.3)
    axes.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
