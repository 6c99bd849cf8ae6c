"""JSON API: search by image, gallery images, evaluation curve, health and metrics.

``POST /api/search``                      multipart ``image`` [+ ``k``, ``index``] → ranked results and a query id;
                                          or ``item=ID`` instead of ``image``: more like that gallery item
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

import time
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Response, jsonify, request, url_for

import catalog
from retrieval.gallery import Gallery
from retrieval.preprocessing import preprocess
from webapp.errors import ApiError, quoted, upload_too_large
from webapp.evaluation import recall_curve_png
from webapp.gallery_search import search_like_item, search_one_thread
from webapp.item_files import item_image_response
from webapp.metrics import milliseconds
from webapp.pairs import ImageView, keep_query, view_of
from webapp.params import check_item, item_id_param
from webapp.served import settings

api = Blueprint("api", __name__)


@api.post("/api/search")
def search():
    started = time.perf_counter()
    served = settings()
    uploads, items = request.files.getlist("image"), request.form.getlist("item")
    if uploads and items:
        raise ApiError(
            400,
            "search by one image or by one gallery item: send the file field 'image' or the field 'item', not both",
        )
    if not uploads and not items:
        raise ApiError(
            400,
            "missing file field 'image' (send the image as multipart/form-data), or field 'item' "
            "(a gallery item id, to search for more like it)",
        )
    k = _parse_k(request.form.get("k"))
    name, gallery = served.gallery(request.form.get("index"), unknown_status=400)
    if items:
        return _search_like_item(started, name, gallery, items, k)
    if len(uploads) > 1:
        raise ApiError(400, f"one image per search: the file field 'image' holds {len(uploads)} files")
    data = uploads[0].read(served.max_upload_bytes + 1)
    if len(data) > served.max_upload_bytes:
        raise ApiError(413, upload_too_large(served.max_upload_bytes))
    try:
        query = served.compute.run(embed_and_search, data, gallery, k, served.max_pixels)
    except catalog.ImageLoadError as exc:
        raise ApiError(400, f"cannot read the uploaded image: {exc.reason}") from None
    timings = query.timings
    for stage, seconds in timings.items():
        served.metrics.observe(stage, seconds)
    with served.metrics.timed("render", timings):
        query_id = keep_query(served, data, query.view)
        results = _results(name, gallery, query.scores[0], query.ids[0], {"query": query_id})
    return _search_response(started, results, name, timings, query_id=query_id, query_item=None)


def _search_like_item(started: float, name: str, gallery: Gallery, items: list[str], k: int) -> Response:
    """The search for more like gallery item ``items[0]`` (its stored vector; the item itself left out)."""
    served = settings()
    if len(items) > 1:
        raise ApiError(400, f"one item per search: the field 'item' is given {len(items)} times")
    item = item_id_param("item", items[0])
    check_item(name, gallery, item)
    timings: dict[str, float] = {}
    with served.metrics.timed("search", timings):
        scores, ids = served.compute.run(search_like_item, gallery, item, k)
    with served.metrics.timed("render", timings):
        results = _results(name, gallery, scores, ids, {"query_item": item})
    return _search_response(started, results, name, timings, query_id=None, query_item=item_json(name, gallery, item))


def _results(name: str, gallery: Gallery, scores: np.ndarray, ids: np.ndarray, query: dict) -> list[dict]:
    """A search's results as JSON; ``query`` names the query in their heatmap and pair URLs."""
    return [
        {
            "id": item_id,
            "score": score,
            "label": gallery.item(item_id).label,
            "image_url": url_for("api.item_image", item_id=item_id, index=name),
            "heatmap_url": url_for("pair_api.heatmap", **query, item=item_id, index=name),
            "pair_url": url_for("pages.pair", **query, item=item_id, index=name),
        }
        for score, item_id in zip(scores.tolist(), ids.tolist())
        if item_id >= 0  # FAISS pads with -1 when an approximate index finds fewer than k
    ]


def _search_response(started: float, results: list[dict], name: str, timings: dict[str, float], **query) -> Response:
    timings["total"] = time.perf_counter() - started
    return jsonify(
        results=results,
        index=name,
        **query,
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
class SearchedQuery:
    """An uploaded query decoded, embedded and searched, with the seconds each stage took."""

    view: ImageView  # what its heatmaps need
    scores: np.ndarray  # [1, k]
    ids: np.ndarray  # [1, k]
    timings: dict[str, float]


def embed_and_search(data: bytes, gallery: Gallery, k: int, max_pixels: int) -> SearchedQuery:
    """Decode (no more pixels than the model needs), embed and search one upload; runs in a compute slot."""
    spec = gallery.embedder.preprocessing
    started = time.perf_counter()
    image = catalog.decode_rgb(data, max_pixels=max_pixels, min_side=spec.decode_side)
    decoded = time.perf_counter()
    pixels = preprocess(image, spec)  # preprocessing + the model, as in `sct index`
    del image
    embeddings, maps = gallery.embedder.embed_pixels_with_maps(pixels[None])
    embedded = time.perf_counter()
    scores, ids = search_one_thread(gallery, embeddings, k)
    searched = time.perf_counter()
    timings = {"decode": decoded - started, "embed": embedded - decoded, "search": searched - embedded}
    return SearchedQuery(view_of(pixels, embeddings[0], maps[0], gallery), scores, ids, timings)


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
