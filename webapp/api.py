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

import faiss
import numpy as np
from flask import Blueprint, Response, jsonify, request, send_file, url_for

import catalog
from retrieval.gallery import Gallery
from retrieval.preprocessing import preprocess
from webapp.errors import ApiError, quoted
from webapp.evaluation import read_eval, recall_curve_png
from webapp.metrics import milliseconds
from webapp.pairs import keep_query, view_of
from webapp.served import item_file, settings

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

    timings: dict[str, float] = {}
    with served.metrics.timed("decode", timings):
        try:
            image = catalog.decode_rgb(upload.read(), max_pixels=served.max_pixels)
        except catalog.ImageLoadError as exc:
            raise ApiError(400, f"cannot read the uploaded image: {exc.reason}") from None
    with served.metrics.timed("embed", timings):  # preprocessing + the model, as in `sct index`
        pixels = preprocess(image, gallery.embedder.preprocessing)
        embeddings, maps = gallery.embedder.embed_pixels_with_maps(pixels[None])
    with served.metrics.timed("search", timings):
        scores, ids = _search_one_thread(gallery, embeddings, k)
    with served.metrics.timed("render", timings):
        query_id = keep_query(name, view_of(pixels, embeddings[0], maps[0], gallery))
        results = [
            {
                "id": item_id,
                "score": score,
                "label": gallery.items[item_id].label,
                "image_url": url_for("api.item_image", item_id=item_id, index=name),
                "heatmap_url": url_for("pair_api.heatmap", query=query_id, item=item_id, index=name),
                "pair_url": url_for("pages.pair", query=query_id, item=item_id, index=name),
            }
            for score, item_id in zip(scores[0].tolist(), ids[0].tolist())
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
    if item_id >= len(gallery.items):
        raise ApiError(404, f"no item {item_id} in gallery {name!r} ({len(gallery.items)} items)")
    path = item_file(gallery.items[item_id])  # from items.csv only, never from the request
    if not path.is_file():
        raise ApiError(404, f"the image file of item {item_id} in gallery {name!r} is missing")
    return send_file(path)


@api.get("/api/evaluation/recall.png")
def recall_curve():
    name, _ = settings().gallery(request.args.get("index"), unknown_status=404)
    try:
        results = read_eval(settings().indexes[name].directory)
    except ValueError as exc:
        raise ApiError(404, str(exc)) from None
    if results is None:
        raise ApiError(404, f"gallery {name!r} has no eval.json yet; create it with `sct eval --index DIR`")
    return Response(recall_curve_png(results), mimetype="image/png")


@api.get("/healthz")
def healthz():
    indexes = []
    for name, live in settings().indexes.items():
        manifest = live.current().manifest
        indexes.append({"name": name, "count": int(manifest["count"]), "model_sha256": manifest["model_sha256"],
                        "dim": int(manifest["embedding_dim"])})
    return jsonify(status="ok", indexes=indexes)


@api.get("/metrics")
def metrics():
    served = settings()
    return jsonify(**served.metrics.snapshot(), queries_kept=len(served.queries),
                   item_views_cached=len(served.item_views))


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
