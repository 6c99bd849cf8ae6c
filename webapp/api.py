"""JSON API: search by image, gallery images, health.

``POST /api/search``                      multipart ``image`` [+ ``k``, ``index``] → ranked results
``GET  /api/items/<id>/image?index=NAME`` the gallery image of item ``id`` (default gallery without ``index``)
``GET  /healthz``                         status and the galleries served

Each result's ``image_url`` is the second route with ``index`` always set, so
it stays valid whichever gallery is the default.
"""

from __future__ import annotations

import time

import numpy as np
from flask import Blueprint, jsonify, request, send_file, url_for

import catalog
from retrieval.gallery import Gallery
from webapp.errors import ApiError
from webapp.served import item_file, settings

api = Blueprint("api", __name__)


@api.post("/api/search")
def search():
    started = time.perf_counter()
    upload = request.files.get("image")
    if upload is None:
        raise ApiError(400, "missing file field 'image' (send the image as multipart/form-data)")
    k = _parse_k(request.form.get("k"))
    name, gallery = _gallery(request.form.get("index"), unknown_status=400)

    decode_start = time.perf_counter()
    data = upload.read()
    try:
        image = catalog.decode_rgb(data, max_pixels=settings().max_pixels)
    except catalog.ImageLoadError as exc:
        raise ApiError(400, f"cannot read the uploaded image: {exc.reason}") from None
    embed_start = time.perf_counter()
    query = gallery.embedder.embed_images([image])
    search_start = time.perf_counter()
    scores, ids = gallery.search(query, k)
    search_end = time.perf_counter()

    results = [
        {
            "id": item_id,
            "score": score,
            "label": gallery.items[item_id].label,
            "image_url": url_for("api.item_image", item_id=item_id, index=name),
        }
        for score, item_id in zip(scores[0].tolist(), ids[0].tolist())
        if item_id >= 0  # FAISS pads with -1 when an approximate index finds fewer than k
    ]
    return jsonify(
        results=results,
        index=name,
        timings_ms={
            "decode": _ms(embed_start - decode_start),
            "embed": _ms(search_start - embed_start),
            "search": _ms(search_end - search_start),
            "total": _ms(time.perf_counter() - started),
        },
    )


@api.get("/api/items/<int:item_id>/image")
def item_image(item_id: int):
    name, gallery = _gallery(request.args.get("index"), unknown_status=404)
    if item_id >= len(gallery.items):
        raise ApiError(404, f"no item {item_id} in gallery {name!r} ({len(gallery.items)} items)")
    path = item_file(gallery.items[item_id])  # from items.csv only, never from the request
    if not path.is_file():
        raise ApiError(404, f"the image file of item {item_id} in gallery {name!r} is missing")
    return send_file(path)


@api.get("/healthz")
def healthz():
    indexes = [
        {
            "name": name,
            "count": int(gallery.manifest["count"]),
            "model_sha256": gallery.manifest["model_sha256"],
            "dim": int(gallery.manifest["embedding_dim"]),
        }
        for name, gallery in settings().indexes.items()
    ]
    return jsonify(status="ok", indexes=indexes)


def _parse_k(raw: str | None) -> int:
    limits = settings()
    if raw is None or raw.strip() == "":
        return limits.default_k
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, f"k must be an integer between 1 and {limits.max_k}, got {raw!r}") from None
    if not 1 <= k <= limits.max_k:
        raise ApiError(400, f"k must be between 1 and {limits.max_k}, got {k}")
    return k


def _gallery(name: str | None, *, unknown_status: int) -> tuple[str, Gallery]:
    """The named gallery, or the default one when no name is given."""
    indexes = settings().indexes
    name = name or settings().default_index
    if name not in indexes:
        raise ApiError(unknown_status, f"unknown index {name!r}; served: {', '.join(indexes)}")
    return name, indexes[name]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
