"""Rows of eval_queries.npz as the evaluation browser shows them: a query, its first correct rank and its rank list
with each result marked correct or wrong, and the URLs of its images, pair views and item searches.

Only the rows asked for are read. A result is correct when its gallery label is
the query's label, as ``sct eval`` counts it. Ids the gallery no longer has (a
file older than a rebuild with the same model) are shown as such, without links.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flask import url_for

from retrieval.gallery import Gallery
from retrieval.query_results import QueryResults


@dataclass(frozen=True)
class RankedResult:
    rank: int  # 1-based
    id: int
    score: float
    label: str | None  # None: the gallery has no item of this id now
    correct: bool
    image_url: str | None
    pair_url: str | None  # None in "queries" mode: the query is no gallery item
    more_url: str | None  # the search page's item search for more like this result


@dataclass(frozen=True)
class QueryRow:
    row: int
    label: str
    query_item: int | None  # the gallery item that is the query (leave-one-out), None for an external image
    query_path: str | None  # the query image's path ("queries" mode)
    image_url: str | None
    more_url: str | None
    first_correct_rank: int  # 0: none within the searched depth
    relevant: int
    ap_at_r: float
    r_precision: float
    url: str  # this query's page
    results: list[RankedResult]


def query_row(results: QueryResults, row: int, name: str, gallery: Gallery, top: int | None = None) -> QueryRow:
    """Row ``row`` with its first ``top`` results (all those the file keeps when None)."""
    label = results.label_of(row)
    query_item = int(results.query_item[row])
    query_item = query_item if gallery.has_item(query_item) else None
    query_path = results.query_path[row].decode("utf-8", "replace") if results.mode == "queries" else None
    ids, scores = results.top_ids[row, :top], results.top_scores[row, :top]
    ranked = [
        _ranked(rank, int(item), float(score), label, query_item, name, gallery)
        for rank, (item, score) in enumerate(zip(ids, scores), start=1)
        if item >= 0 and np.isfinite(score)
    ]
    return QueryRow(
        row=row,
        label=label,
        query_item=query_item,
        query_path=query_path,
        image_url=None if query_item is None else url_for("api.item_image", item_id=query_item, index=name),
        more_url=None if query_item is None else url_for("pages.index", item=query_item, index=name),
        first_correct_rank=int(results.first_correct_rank[row]),
        relevant=int(results.relevant[row]),
        ap_at_r=float(results.ap_at_r[row]),
        r_precision=float(results.r_precision[row]),
        url=url_for("eval_browser.query", index=name, row=row),
        results=ranked,
    )


def _ranked(
    rank: int, item: int, score: float, query_label: str, query_item: int | None, name: str, gallery: Gallery
) -> RankedResult:
    if not gallery.has_item(item):
        return RankedResult(rank, item, score, None, False, None, None, None)
    label = gallery.item(item).label
    return RankedResult(
        rank=rank,
        id=item,
        score=score,
        label=label,
        correct=label == query_label,
        image_url=url_for("api.item_image", item_id=item, index=name),
        pair_url=None if query_item is None else url_for("pages.pair", query_item=query_item, item=item, index=name),
        more_url=url_for("pages.index", item=item, index=name),
    )
