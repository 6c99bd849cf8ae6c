"""JSON API: search by image, gallery images, evaluation curve, health and metrics.

``POST /api/search``                      multipart ``image`` [+ ``k``, ``index``] → ranked results and a query id;
                                          several ``image`` files → each one's results and query id, in order;
                                          or ``item=ID`` instead of ``image``: more like that gallery item;
                                          ``label``, ``exclude_label``, ``ids``, ``id_range``: only such items
``GET  /api/items/<id>/image?index=NAME`` the gallery image of item ``id`` (default gallery without ``index``)
``GET  /api/evaluation/recall.png?index=NAME``  the gallery's Recall@K curve, from its eval.json
``GET  /healthz``                         status and the galleries served
``GET  /metrics``                         request counts and latencies of all workers, in Prometheus's text format

Each result's URLs carry ``index``, so they stay valid whichever gallery is
the default; ``heatmap_url`` and ``pair_url`` carry the search's ``query_id``
(webapp.pairs, webapp.pair_api), or for an item search ``query_item=ID``,
which needs no state kept by the server process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Response, jsonify, request, url_for
from werkzeug.datastructures import FileStorage

import catalog
from core.errors import UserValueError
from retrieval.filter_params import build_filter
from retrieval.filters import SearchFilter
from retrieval.gallery import Gallery
from retrieval.preprocessing import preprocess
from retrieval.rerank import METHODS as RERANK_METHODS
from retrieval.rerank import RERANK_WITH_FILTER
from webapp.errors import ApiError, batch_limit, quoted
from webapp.evaluation import recall_curve_png
from webapp.gallery_search import search_like_item, search_one_thread
from webapp.item_files import item_image_response
from webapp.metrics import milliseconds
from webapp.pairs import ImageView, keep_query, view_of
from webapp.params import check_item, item_id_param
from webapp.served import settings
from webapp.uploads import read_limited

api = Blueprint("api", __name__)


@api.post("/api/search")
def search():
    started = time.perf_counter()
    served = settings()
    uploads, items = request.files.getlist("image"), request.form.getlist("item")
    if uploads and items:
        raise ApiError(
            400,
            "search by images or by one gallery item: send the file field 'image' or the field 'item', not both",
        )
    if not uploads and not items:
        raise ApiError(
            400,
            "missing file field 'image' (send the image as multipart/form-data), or field 'item' "
            "(a gallery item id, to search for more like it)",
        )
    k = _parse_k(request.form.get("k"))
    name, gallery = served.gallery(request.form.get("index"), unknown_status=400)
    search_filter = _parse_filter()
    rerank = _parse_rerank(search_filter)
    if items:
        return _search_like_item(started, name, gallery, items, k, search_filter, rerank)
    if len(uploads) > served.max_batch:
        raise ApiError(400, f"too many images: the file field 'image' holds {len(uploads)}; {batch_limit(served)}")
    data = _read_uploads(uploads)
    try:
        searched = served.compute.run(embed_and_search, data, gallery, k, served.max_pixels, search_filter, rerank)
    except UnreadableUpload as exc:
        if len(uploads) == 1:
            raise ApiError(400, f"cannot read the uploaded image: {exc.reason}") from None
        raise ApiError(400, f"cannot read {_upload_name(uploads, exc.position)}: {exc.reason}") from None
    timings = searched.timings
    for stage, seconds in timings.items():
        served.metrics.observe(stage, seconds)
    with served.metrics.timed("render", timings):
        queries = []
        for upload, blob, view, scores, ids in zip(uploads, data, searched.views, searched.scores, searched.ids):
            query_id = keep_query(served, blob, view)
            results = _results(name, gallery, scores, ids, {"query": query_id})
            queries.append({"file": upload.filename or "", "results": results, "query_id": query_id})
    if len(queries) == 1:  # the response of a one-image search
        return _search_response(
            started, name, timings, results=queries[0]["results"], query_id=queries[0]["query_id"], query_item=None
        )
    return _search_response(started, name, timings, queries=queries)


def _read_uploads(uploads: list[FileStorage]) -> list[bytes]:
    """The bytes of each upload; ApiError 413 for one over the per-image limit or all over the per-search one."""
    served = settings()
    data, total = [], 0
    for position, upload in enumerate(uploads):
        which = f" ({_upload_name(uploads, position)})" if len(uploads) > 1 else ""
        data.append(read_limited(upload, served.max_upload_bytes, which))
        total += len(data[-1])
        if total > served.max_batch_bytes:
            raise ApiError(413, f"upload too large: the images total more than the limit, {batch_limit(served)}")
    return data


def _upload_name(uploads: list[FileStorage], position: int) -> str:
    """Upload ``position`` (from 0) of a search, for error messages: ``image 2 of 3 ('b.png')``."""
    return f"image {position + 1} of {len(uploads)} ({quoted(uploads[position].filename or '')})"


#: How the API's error messages name the filter parameters.
_FILTER_PARAMETERS = {"ids": "parameter 'ids'", "id_range": "parameter 'id_range'"}


def _parse_filter() -> SearchFilter | None:
    """The search's filter from the form fields ``label``, ``exclude_label`` (each repeatable), ``ids`` and
    ``id_range``; ApiError 400 for a malformed value."""
    form = request.form
    if len(form.getlist("id_range")) > 1:
        raise ApiError(400, f"parameter 'id_range' is given {len(form.getlist('id_range'))} times; give one range")
    try:
        return build_filter(
            labels=form.getlist("label"),
            exclude_labels=form.getlist("exclude_label"),
            ids=form.getlist("ids"),
            id_range=form.get("id_range"),
            names=_FILTER_PARAMETERS,
        )
    except UserValueError as exc:
        raise ApiError(400, str(exc)) from None


def _parse_rerank(search_filter: SearchFilter | None) -> str:
    """The form field ``rerank``: a re-ranking method of retrieval.rerank ("none" when absent); ApiError 400 for
    another value, or for re-ranking a filtered search."""
    method = request.form.get("rerank") or "none"
    if method not in RERANK_METHODS:
        raise ApiError(400, f"rerank must be one of {', '.join(RERANK_METHODS)}, got {quoted(method)}")
    if method != "none" and search_filter is not None:
        raise ApiError(400, f"{RERANK_WITH_FILTER}: drop the filter fields or rerank")
    return method


def _search_like_item(
    started: float,
    name: str,
    gallery: Gallery,
    items: list[str],
    k: int,
    search_filter: SearchFilter | None,
    rerank: str,
) -> Response:
    """The search for more like gallery item ``items[0]`` (its stored vector; the item itself left out)."""
    served = settings()
    if len(items) > 1:
        raise ApiError(400, f"one item per search: the field 'item' is given {len(items)} times")
    item = item_id_param("item", items[0])
    check_item(name, gallery, item)
    timings: dict[str, float] = {}
    with served.metrics.timed("search", timings):
        scores, ids = served.compute.run(search_like_item, gallery, item, k, search_filter, rerank)
    with served.metrics.timed("render", timings):
        results = _results(name, gallery, scores, ids, {"query_item": item})
    return _search_response(
        started, name, timings, results=results, query_id=None, query_item=item_json(name, gallery, item)
    )


def _results(name: str, gallery: Gallery, scores: np.ndarray, ids: np.ndarray, query: dict) -> list[dict]:
    """A search's results as JSON; ``query`` names the query in their heatmap and pair URLs. ``file`` is the
    item's file name only: the server's folders are no business of its clients."""
    results = []
    for score, item_id in zip(scores.tolist(), ids.tolist()):
        if item_id < 0:  # FAISS pads with -1 when an approximate index (or a filter) finds fewer than k
            continue
        item = gallery.item(item_id)
        results.append(
            {
                "id": item_id,
                "score": score,
                "label": item.label,
                "file": os.path.basename(item.path),
                "image_url": url_for("api.item_image", item_id=item_id, index=name),
                "heatmap_url": url_for("pair_api.heatmap", **query, item=item_id, index=name),
                "pair_url": url_for("pages.pair", **query, item=item_id, index=name),
            }
        )
    return results


def _search_response(started: float, name: str, timings: dict[str, float], **body) -> Response:
    """``body`` (a one-query search's results, query_id and query_item, or a batch's queries) as JSON."""
    timings["total"] = time.perf_counter() - started
    return jsonify(
        **body,
        index=name,
        timings_ms={stage: milliseconds(seconds) for stage, seconds in timings.items()},
    )


def item_json(name: str, gallery: Gallery, item: int) -> dict:
    """A gallery item's id, label and image URL, as the JSON API describes an item."""
    return {
        "id": item,
        "label": gallery.item(item).label,
        "image_url": url_for("api.item_image", item_id=item, index=name),
    }


@api.get("/api/items/<int:item_id>/image")
def item_image(item_id: int):
    name, gallery = settings().gallery(request.args.get("index"), unknown_status=404)
    return item_image_response(name, gallery, item_id)


@api.get("/api/evaluation/recall.png")
def recall_curve():
    name, _ = settings().gallery(request.args.get("index"), unknown_status=404)
    try:
        png = recall_curve_png(settings().indexes[name].directory)
    except ValueError as exc:
        raise ApiError(404, str(exc)) from None
    if png is None:
        raise ApiError(404, f"gallery {name!r} has no eval.json yet; create it with `sct eval --index DIR`")
    response = Response(png, mimetype="image/png")
    response.add_etag()
    response.cache_control.no_cache = True  # the URL stays when eval.json is rebuilt: revalidate by ETag
    return response.make_conditional(request)


@api.get("/healthz")
def healthz():
    """ "ok", or "degraded" (still HTTP 200: every gallery is still served) with each problem, for monitoring."""
    indexes, problems = [], []
    for name, live in settings().indexes.items():
        manifest = live.current().manifest
        indexes.append(
            {
                "name": name,
                "count": int(manifest["count"]),
                "model_sha256": manifest["model_sha256"],
                "dim": int(manifest["embedding_dim"]),
            }
        )
        problem = live.problem
        if problem is not None:
            indexes[-1]["problem"] = problem
            problems.append(f"{name}: {problem}")
    if problems:
        return jsonify(status="degraded", problems=problems, indexes=indexes)
    return jsonify(status="ok", indexes=indexes)


@api.get("/metrics")
def metrics():
    body, content_type = settings().metrics.exposition()
    return Response(body, content_type=content_type)


@dataclass(frozen=True)
class SearchedQueries:
    """Uploaded queries decoded, embedded and searched, with the seconds each stage took (for all of them)."""

    views: list[ImageView]  # what their heatmaps need, in upload order
    scores: np.ndarray  # [M, k]
    ids: np.ndarray  # [M, k]
    timings: dict[str, float]


class UnreadableUpload(Exception):
    """Upload ``position`` (from 0) of a search cannot be decoded, for ``reason``."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


def embed_and_search(
    uploads: list[bytes],
    gallery: Gallery,
    k: int,
    max_pixels: int,
    search_filter: SearchFilter | None = None,
    rerank: str = "none",
) -> SearchedQueries:
    """Decode each upload (no more pixels than the model needs, one at a time), embed them in one model call and
    search them in one FAISS call; runs in a compute slot. UnreadableUpload names the first that cannot be read."""
    spec = gallery.embedder.preprocessing
    started = time.perf_counter()
    pixels = []
    for position, data in enumerate(uploads):
        try:
            image = catalog.decode_rgb(data, max_pixels=max_pixels, min_side=spec.decode_side)
        except catalog.ImageLoadError as exc:
            raise UnreadableUpload(position, exc.reason) from None
        pixels.append(preprocess(image, spec))  # preprocessing + the model, as in `sct index`
        del image
    decoded = time.perf_counter()
    embeddings, maps = gallery.embedder.embed_pixels_with_maps(np.stack(pixels))
    embedded = time.perf_counter()
    scores, ids = search_one_thread(gallery, embeddings, k, search_filter, rerank)
    searched = time.perf_counter()
    timings = {"decode": decoded - started, "embed": embedded - decoded, "search": searched - embedded}
    views = [view_of(*view, gallery) for view in zip(pixels, embeddings, maps)]
    return SearchedQueries(views, scores, ids, timings)


def _parse_k(raw: str | None) -> int:
    limits = settings()
    if raw is None or raw.strip() == "":
        return limits.default_k
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, f"k must be an integer between 1 and {limits.max_k}, got {quoted(raw)}") from None
    if not 1 <= k <= limits.max_k:
        raise ApiError(400, f"k must be between 1 and {limits.max_k}, got {k}")
    return k
