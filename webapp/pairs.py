"""Query ↔ result pairs for similarity heatmaps: what a search keeps, and the pair it later compares.

A search keeps its query's view (unit embedding, feature map and the crop the
model saw) in a bounded LRU under a random query id, so that heatmaps can be
drawn after the response went out. A gallery item's view is computed on
demand by embedding its image file, found by id through items.csv, with the
gallery's own model, and cached by (model, file) for the few requests of one
pair view. The query of a pair can also be a gallery item (``query_item``):
its view is made the same way, so such a pair needs no state kept by the
server process and any worker answers it.

The functions take the served state they use (``SearchSettings``, or just its
kept queries) as arguments, so that they also run outside a Flask request; the
views pass in their app's settings.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

import catalog
from retrieval.gallery import Gallery
from retrieval.heatmaps import contribution_grid, crop_of, symmetric_limit
from retrieval.preprocessing import preprocess
from webapp.cache import LruCache
from webapp.errors import ApiError, quoted
from webapp.item_files import opened_item_file
from webapp.params import check_item, item_id_param
from webapp.served import SearchSettings


@dataclass(frozen=True)
class ImageView:
    """What a heatmap needs of one image, as embedded by one model."""

    embedding: np.ndarray  # unit embedding [d]
    feature_map: np.ndarray  # projected map [Z, d]
    image: Image.Image  # the square crop the model saw
    model_sha256: str


@dataclass(frozen=True)
class Pair:
    """A query and a gallery item, with each one's share of their cosine per location."""

    index: str
    item_id: int
    label: str
    query: ImageView
    item: ImageView
    query_cells: np.ndarray  # [h, w], sums to the cosine
    item_cells: np.ndarray  # [h, w], sums to the cosine
    limit: float  # the colour scale ±limit shared by both heatmaps
    gallery: Gallery  # the version of gallery ``index`` compared in
    query_id: str | None  # the kept query's id, or None when the query is a gallery item
    query_item: int | None  # the gallery item that is the query, or None for a kept query

    @property
    def query_ref(self) -> dict[str, str | int]:
        """How URLs name the query: ``{"query": QID}`` or ``{"query_item": ID}``."""
        return {"query": self.query_id} if self.query_id is not None else {"query_item": self.query_item}

    @property
    def cosine(self) -> float:
        return float(self.query.embedding @ self.item.embedding)


def view_of(pixels: np.ndarray, embedding: np.ndarray, feature_map: np.ndarray, gallery: Gallery) -> ImageView:
    """The view of an image preprocessed to ``pixels`` [3, S, S], embedded by the model of ``gallery``."""
    return ImageView(
        embedding=embedding,
        feature_map=feature_map,
        image=crop_of(pixels, gallery.embedder.preprocessing),
        model_sha256=gallery.manifest["model_sha256"],
    )


def requested_pair(served: SearchSettings, args: Mapping[str, str]) -> Pair:
    """The pair named by the request parameters ``item``, ``index`` and one of ``query`` (a kept query's id;
    ``index`` defaults to the gallery it was searched in) or ``query_item`` (an item of the same gallery;
    ``index`` defaults to the default gallery)."""
    item = item_id_param("item", args.get("item"))
    if args.get("query_item") is not None:
        if args.get("query") is not None:
            raise ApiError(
                400,
                "give one query: parameter 'query' (a search's query_id) or 'query_item' "
                "(a gallery item id), not both",
            )
        query_item = item_id_param("query_item", args["query_item"])
        name, gallery = served.gallery(args.get("index"), unknown_status=404)
        check_item(name, gallery, query_item)
        query = item_view(served, name, gallery, query_item)
        return compare(served, query, name, gallery, item, query_item=query_item)
    searched_in, query = kept_query(served.queries, args.get("query"))
    name, gallery = served.gallery(args.get("index") or searched_in, unknown_status=404)
    return compare(served, query, name, gallery, item, query_id=args["query"])


def keep_query(queries: LruCache[str, tuple[str, ImageView]], name: str, view: ImageView) -> str:
    """Keep the view of a query searched in gallery ``name`` in ``queries`` for later heatmaps; returns its new
    random id."""
    query_id = secrets.token_urlsafe(12)
    queries.put(query_id, (name, view))
    return query_id


def kept_query(queries: LruCache[str, tuple[str, ImageView]], query_id: str | None) -> tuple[str, ImageView]:
    """The gallery name and view of a query kept in ``queries``."""
    if not query_id:
        raise ApiError(
            400,
            "missing parameter 'query' (the query_id of a search response), or 'query_item' (a gallery item id)",
        )
    kept = queries.get(query_id)
    if kept is None:
        raise ApiError(
            404,
            f"unknown or expired query id {quoted(query_id)}: queries are kept for {queries.ttl_s / 60:g} minutes "
            f"(the latest {queries.capacity} searches of this server process); search again",
        )
    return kept


def compare(
    served: SearchSettings,
    query: ImageView,
    name: str,
    gallery: Gallery,
    item_id: int,
    *,
    query_id: str | None = None,
    query_item: int | None = None,
) -> Pair:
    """The pair of a query and gallery item ``item_id``. The query is the kept query ``query_id`` or the gallery
    item ``query_item`` (one of them, for the pair's URLs) and must come from the gallery's model."""
    if (query_id is None) == (query_item is None):
        raise ValueError("a pair's query is either a kept query (query_id) or a gallery item (query_item)")
    if query.model_sha256 != gallery.manifest["model_sha256"]:
        raise ApiError(
            409,
            f"this query was embedded with model {query.model_sha256[:12]} but gallery {name!r} now uses "
            f"model {gallery.manifest['model_sha256'][:12]} (it was rebuilt, or is another gallery); search again",
        )
    item = item_view(served, name, gallery, item_id)
    query_cells = contribution_grid(query.feature_map, item.embedding)
    item_cells = contribution_grid(item.feature_map, query.embedding)
    limit = symmetric_limit(query_cells, item_cells)
    label = gallery.item(item_id).label
    return Pair(name, item_id, label, query, item, query_cells, item_cells, limit, gallery, query_id, query_item)


def item_view(served: SearchSettings, name: str, gallery: Gallery, item_id: int) -> ImageView:
    """The view of gallery item ``item_id``, from the cache or by embedding its image file now."""
    with opened_item_file(name, gallery, item_id) as item:  # only a file inside the gallery's image roots
        key = (gallery.manifest["model_sha256"], *item.identity)
        cached = served.item_views.get(key)
        if cached is not None:  # a pair view asks four times: the file is read only the first
            return cached
        data = item.file.read()
    with served.metrics.timed("item_view"):
        try:
            view = served.compute.run(embedded_view, data, gallery, served.max_pixels)
        except catalog.ImageLoadError as exc:
            raise ApiError(
                404, f"the image file of item {item_id} in gallery {name!r} " f"cannot be read: {exc.reason}"
            ) from None
    served.item_views.put(key, view)
    return view


def embedded_view(data: bytes, gallery: Gallery, max_pixels: int) -> ImageView:
    """Decode an image file's bytes as ``sct index`` does and embed them with the gallery's model (in a compute
    slot; see webapp.compute)."""
    spec = gallery.embedder.preprocessing
    pixels = preprocess(catalog.decode_rgb(data, max_pixels=max_pixels, min_side=spec.decode_side), spec)
    embeddings, maps = gallery.embedder.embed_pixels_with_maps(pixels[None])
    return view_of(pixels, embeddings[0], maps[0], gallery)
