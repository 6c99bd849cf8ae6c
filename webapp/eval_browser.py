"""The evaluation browser: pages over a gallery's per-query evaluation (eval_queries.npz), beside /evaluation.

``GET /evaluation/classes?index=NAME[&page=P]``              every class, worst first: Recall@1, MAP@R, queries
``GET /evaluation/failures?index=NAME[&label=L][&page=P]``   the queries that fail at Recall@1, of class L when given
``GET /evaluation/query?index=NAME&row=N``                   one query's rank list, each result marked, with links
``GET /api/evaluation/similarities.png?index=NAME``          the histogram of positive and negative similarities

Lists are paginated server-side (``PER_PAGE`` a page); a page reads only its
own rows of the file (webapp.query_browser, webapp.rank_lists).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, render_template, request, url_for

from retrieval.gallery import Gallery
from retrieval.query_results import QUERY_RESULTS_FILE
from webapp.errors import ApiError, quoted
from webapp.params import whole_number
from webapp.query_browser import LoadedQueries, histogram_png, loaded_queries, stale_message
from webapp.rank_lists import query_row
from webapp.served import settings

eval_browser = Blueprint("eval_browser", __name__)

PER_PAGE = 50  # classes or failing queries per page
TOP_FEW = 5  # results shown with each failing query
WORST_SHOWN = 10  # classes on the evaluation page


@dataclass(frozen=True)
class Pagination:
    page: int  # 1-based
    pages: int
    total: int

    @classmethod
    def of(cls, total: int, raw_page: str | None) -> Pagination:
        """Page ``raw_page`` (1 when not given) of ``total`` entries; 400 for a bad number, 404 past the end."""
        pages = max(1, math.ceil(total / PER_PAGE))
        page = 1 if raw_page is None else whole_number("page", raw_page, "a page number")
        if not 1 <= page <= pages:
            raise ApiError(404, f"no page {page}: there {'is 1 page' if pages == 1 else f'are {pages} pages'}")
        return cls(page, pages, total)

    @property
    def start(self) -> int:
        return (self.page - 1) * PER_PAGE

    @property
    def stop(self) -> int:
        return min(self.start + PER_PAGE, self.total)


def evaluation_section(name: str, gallery: Gallery, evaluated: bool) -> dict[str, Any]:
    """What the evaluation page shows of the per-query results: ``problem`` (a message) or the summary."""
    served = settings()
    try:
        loaded = loaded_queries(served.indexes[name].directory, name, served.compute.run)
    except ApiError as exc:
        return {"problem": exc.message}
    if loaded is None:
        if not evaluated:
            return {}  # the page already says to run sct eval
        return {
            "missing": f"This evaluation has no per-query results ({QUERY_RESULTS_FILE}), made by newer versions "
            f"of sct eval: run `sct eval --index DIR` on the folder of gallery {name} again to browse its queries."
        }
    stale = stale_message(name, loaded, gallery.manifest["model_sha256"])
    if stale is not None:
        return {"problem": stale}
    return {
        "loaded": loaded,
        "queries": len(loaded.results),
        "failing": len(loaded.failing),
        "worst": loaded.classes[:WORST_SHOWN],
        "classes": len(loaded.classes),
    }


@eval_browser.get("/evaluation/classes")
def classes():
    name, _, loaded = _browsed()
    pagination = Pagination.of(len(loaded.classes), request.args.get("page"))
    shown = loaded.classes[pagination.start : pagination.stop]
    return render_template(
        "eval_classes.html",
        name=name,
        classes=[(result, len(loaded.failing_of(result.label))) for result in shown],
        first_rank=pagination.start + 1,
        pagination=pagination,
        page_url=lambda page: url_for("eval_browser.classes", index=name, page=page),
    )


@eval_browser.get("/evaluation/failures")
def failures():
    name, gallery, loaded = _browsed()
    label = request.args.get("label") or None
    if label is not None and label not in loaded.classes_by_label:
        raise ApiError(404, f"no evaluated query of gallery {name!r} has the label {quoted(label)}")
    rows = loaded.failing_of(label)
    pagination = Pagination.of(len(rows), request.args.get("page"))
    results = loaded.results
    return render_template(
        "eval_failures.html",
        name=name,
        label=label,
        summary=None if label is None else loaded.classes_by_label.get(label),
        mode=results.mode,
        depth=results.depth,
        queries=len(results),
        rows=[query_row(results, int(row), name, gallery, TOP_FEW) for row in rows[pagination.start : pagination.stop]],
        pagination=pagination,
        page_url=lambda page: url_for("eval_browser.failures", index=name, label=label, page=page),
    )


@eval_browser.get("/evaluation/query")
def query():
    name, gallery, loaded = _browsed()
    results = loaded.results
    row = whole_number("row", request.args.get("row"), "a query row of the evaluation")
    if row >= len(results):
        raise ApiError(404, f"no query row {row}: the evaluation of gallery {name!r} has {len(results):,} rows")
    shown = query_row(results, row, name, gallery)
    failing = loaded.failing
    after = int(np.searchsorted(failing, row, side="right"))
    before = int(np.searchsorted(failing, row, side="left")) - 1
    return render_template(
        "eval_query.html",
        name=name,
        query=shown,
        mode=results.mode,
        depth=results.depth,
        queries=len(results),
        summary=loaded.classes_by_label.get(shown.label),
        previous_url=url_for("eval_browser.query", index=name, row=row - 1) if row > 0 else None,
        next_url=url_for("eval_browser.query", index=name, row=row + 1) if row + 1 < len(results) else None,
        previous_failing_url=url_for("eval_browser.query", index=name, row=int(failing[before]))
        if before >= 0
        else None,
        next_failing_url=url_for("eval_browser.query", index=name, row=int(failing[after]))
        if after < len(failing)
        else None,
    )


@eval_browser.get("/api/evaluation/similarities.png")
def similarities():
    served = settings()
    name, _ = served.gallery(request.args.get("index"), unknown_status=404)
    loaded = loaded_queries(served.indexes[name].directory, name, served.compute.run)
    if loaded is None:
        raise ApiError(404, _missing(name))
    response = Response(served.compute.run(histogram_png, loaded), mimetype="image/png")
    response.add_etag()
    response.cache_control.no_cache = True  # the URL stays when the file is rebuilt: revalidate by ETag
    return response.make_conditional(request)


def _browsed() -> tuple[str, Gallery, LoadedQueries]:
    """The requested gallery and its per-query results; 404 without them, 409 when they are of another model."""
    served = settings()
    name, gallery = served.gallery(request.args.get("index"), unknown_status=404)
    loaded = loaded_queries(served.indexes[name].directory, name, served.compute.run)
    if loaded is None:
        raise ApiError(404, _missing(name))
    stale = stale_message(name, loaded, gallery.manifest["model_sha256"])
    if stale is not None:
        raise ApiError(409, stale)
    return name, gallery, loaded


def _missing(name: str) -> str:
    return (
        f"gallery {name!r} has no per-query results ({QUERY_RESULTS_FILE}) yet; "
        "create them with `sct eval --index DIR`"
    )
