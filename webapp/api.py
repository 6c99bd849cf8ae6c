"""JSON API: search by image, gallery images, evaluation curve, health and metrics.

``POST /api/search``                      multipart ``image`` [+ ``k``, ``index``] → ranked results and a query id
``GET  /api/items/<id>/image?index=NAME`` the gallery image of item ``id`` (default gallery without ``index``)
``GET  /api/evaluation/recall.png?index=NAME``  the gallery's Recall@K curve, from its eval.json
``GET  /healthz``                         status and the galleries served
``GET  /metrics``                         request counts and stage latencies of this worker

Each result's URLs carry ``index``, so they stay valid whichever gallery is
the default; ``heatmap_url`` and ``pair_url`` carry the search's ``query_id``
(webapp.pairs, webapp.pair_api).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
from flask import Blueprint, Response, jsonify, request, url_for

import catalog
from retrieval.gallery import Gallery
from retrieval.preprocessing import preprocess
from webapp.errors import ApiError, quoted, upload_too_large
from webapp.evaluation import recall_curve_png
from webapp.item_files import item_image_response
from webapp.metrics import milliseconds
from webapp.pairs import ImageView, keep_query, view_of
from webapp.served import settings

api = Blueprint("api", __name__)


@api.post("/api/search")
def search():
    started = time.perf_counter()
    served = settings()
    uploads = request.files.getlist("image")
    if not uploads:
        raise ApiError(400, "missing file field 'image' (send the image as multipart/form-data)")
    if len(uploads) > 1:
        raise ApiError(400, f"one image per search: the file field 'image' holds {len(uploads)} files")
    upload = uploads[0]
    k = _parse_k(request.form.get("k"))
    name, gallery = served.gallery(request.form.get("index"), unknown_status=400)

    data = upload.read(served.max_upload_bytes + 1)
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
        query_id = keep_query(served.queries, name, query.view)
        results = [
            {
                "id": item_id,
                "score": score,
                "label": gallery.items[item_id].label,
                "image_url": url_for("api.item_image", item_id=item_id, index=name),
                "heatmap_url": url_for("pair_api.heatmap", query=query_id, item=item_id, index=name),
                "pair_url": url_for("pages.pair", query=query_id, item=item_id, index=name),
            }
            for score, item_id in zip(query.scores[0].tolist(), query.ids[0].tolist())
            if item_id >= 0  # FAISS pads with -1 when an approximate index finds fewer than k
        ]
    timings["total"] = time.perf_counter() - started
    return jsonify(
        results=results,
        index=name,
        query_id=query_id,
        timings_ms={stage: milliseconds(seconds) for stage, seconds in timings.items()},
    )


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
    served = settings()
    return jsonify(
        **served.metrics.snapshot(), queries_kept=len(served.queries), item_views_cached=len(served.item_views)
    )


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
    scores, ids = _search_one_thread(gallery, embeddings, k)
    searched = time.perf_counter()
    timings = {"decode": decoded - started, "embed": embedded - decoded, "search": searched - embedded}
    return SearchedQuery(view_of(pixels, embeddings[0], maps[0], gallery), scores, ids, timings)


def _search_one_thread(gallery: Gallery, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``gallery.search`` with one OpenMP thread in this request thread.

    FAISS spreads even a single query over every core with OpenMP. On a server
    the other cores are busy (ONNX Runtime, other requests), and waiting for
    those threads made one search of 10,000 × 512 take about 16 ms instead of
    0.4 ms (benchmarks/results/search_latency.md). OpenMP's thread count is a
    per-thread setting, restored afterwards.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return gallery.search(queries, k)
    finally:
        faiss.omp_set_num_threads(previous)


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
