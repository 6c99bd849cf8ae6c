"""Query ↔ result pairs for similarity heatmaps: the query a search names, and the pair it later compares.

A search by upload names its query by the content id of the uploaded bytes
(webapp.query_store) and writes them to the query store, a folder that every
worker of the server, and every server given the same folder, reads. The
worker that ran the search also keeps the query's view (unit embedding,
feature map and the crop the model saw) in a bounded LRU; on any other worker,
or after the LRU dropped it, the view is made again by embedding the stored
bytes with the gallery's model, so that any worker answers a pair. A gallery
item's view is computed on demand by embedding its image file, found by id
through items.csv, with the gallery's own model, and cached by (model, file)
for the few requests of one pair view. The query of a pair can also be a
gallery item (``query_item``), whose view is made the same way, or an image
posted with the request, which nothing keeps.

The functions take the served state they use (``SearchSettings``) as
arguments, so that they also run outside a Flask request; the views pass in
their app's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

import catalog
from retrieval.gallery import Gallery
from retrieval.heatmaps import contribution_grid, crop_of, symmetric_limit
from retrieval.preprocessing import preprocess
from webapp.errors import ApiError, quoted
from webapp.item_files import opened_item_file
from webapp.params import check_item, item_id_param
from webapp.query_store import QueryStore, is_query_id, query_id_of
from webapp.served import SearchSettings
from webapp.uploads import unreadable_upload

log = logging.getLogger(__name__)


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
    query_id: str | None  # the uploaded query's content id, or None when the query is a gallery item
    query_item: int | None  # the gallery item that is the query, or None for an uploaded query
    posted: bool = False  # whether the query is an image posted with this request (no URL names it)

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


def requested_pair(served: SearchSettings, args: Mapping[str, str], posted: bytes | None = None) -> Pair:
    """The pair named by the request parameters ``item``, ``index`` (default: the default gallery) and one of
    ``query`` (a search's query id), ``query_item`` (an item of the same gallery) or ``posted``, the bytes of an
    image sent with the request."""
    item = item_id_param("item", args.get("item"))
    if sum(given is not None for given in (args.get("query"), args.get("query_item"), posted)) > 1:
        raise ApiError(
            400,
            "give one query: parameter 'query' (a search's query_id) or 'query_item' (a gallery item id), "
            "or in a POST the file field 'image'; not several",
        )
    name, gallery = served.gallery(args.get("index"), unknown_status=404)
    if posted is not None:
        query = posted_view(served, posted, gallery)
        return compare(served, query, name, gallery, item, query_id=query_id_of(posted), posted=True)
    if args.get("query_item") is not None:
        query_item = item_id_param("query_item", args["query_item"])
        check_item(name, gallery, query_item)
        query = item_view(served, name, gallery, query_item)
        return compare(served, query, name, gallery, item, query_item=query_item)
    query_id = checked_query_id(args.get("query"))
    return compare(served, kept_query(served, query_id, gallery), name, gallery, item, query_id=query_id)


def keep_query(served: SearchSettings, data: bytes, view: ImageView) -> str:
    """Keep an uploaded query, its bytes ``data`` embedded as ``view``, for later heatmaps: the bytes in the
    query store (written in a compute slot, off the event loop), the view in this worker's LRU. Returns its id.
    A store that cannot be written, or no free slot, is logged and leaves the query to this worker."""
    query_id = query_id_of(data)
    served.queries.put((view.model_sha256, query_id), view)
    try:
        served.compute.run(served.query_store.put, query_id, data)
    except (OSError, ApiError) as exc:
        log.warning("cannot write query %s to the query store %s: %s", query_id, served.query_store.directory, exc)
    return query_id


def checked_query_id(query_id: str | None) -> str:
    """``query_id`` when it is one (64 hexadecimal digits); else a 400 when missing, a 404 when malformed."""
    if not query_id:
        raise ApiError(
            400,
            "missing parameter 'query' (the query_id of a search response), or 'query_item' (a gallery item id)",
        )
    if not is_query_id(query_id):
        raise ApiError(
            404,
            f"unknown or expired query id {quoted(query_id)}: the query_id of a search response is 64 hexadecimal "
            "digits; search again",
        )
    return query_id


def kept_query(served: SearchSettings, query_id: str, gallery: Gallery) -> ImageView:
    """The view of query ``query_id`` as embedded by the model of ``gallery``: from this worker's LRU, or made
    again from the query store (and kept in the LRU)."""
    key = (gallery.manifest["model_sha256"], query_id)
    view = served.queries.get(key)
    if view is not None:
        return view
    with served.metrics.timed("query_view"):
        try:
            view = served.compute.run(stored_view, served.query_store, query_id, gallery, served.max_pixels)
        except catalog.ImageLoadError as exc:
            raise unreadable_upload(exc) from None
    if view is None:
        store = served.query_store
        raise ApiError(
            404,
            f"unknown or expired query id {quoted(query_id)}: this server's query store keeps the image of a search "
            f"for {store.max_age_s / 3600:g} h, up to {store.max_bytes / (1 << 20):g} MiB of the latest; search again",
        )
    served.queries.put(key, view)
    return view


def stored_view(store: QueryStore, query_id: str, gallery: Gallery, max_pixels: int) -> ImageView | None:
    """The view of the image stored under ``query_id``, embedded by the model of ``gallery``; None when it is not
    stored (in a compute slot: it reads a file and runs the model)."""
    data = store.get(query_id)
    return None if data is None else embedded_view(data, gallery, max_pixels)


def posted_view(served: SearchSettings, data: bytes, gallery: Gallery) -> ImageView:
    """The view of an image posted with the request, embedded by the model of ``gallery``; kept nowhere."""
    with served.metrics.timed("query_view"):
        try:
            return served.compute.run(embedded_view, data, gallery, served.max_pixels)
        except catalog.ImageLoadError as exc:
            raise unreadable_upload(exc) from None


def compare(
    served: SearchSettings,
    query: ImageView,
    name: str,
    gallery: Gallery,
    item_id: int,
    *,
    query_id: str | None = None,
    query_item: int | None = None,
    posted: bool = False,
) -> Pair:
    """The pair of a query and gallery item ``item_id``. The query is the uploaded query ``query_id`` (``posted``
    with this request, or stored) or the gallery item ``query_item`` (one of them, for the pair's URLs) and must
    come from the gallery's model."""
    if (query_id is None) == (query_item is None):
        raise ValueError("a pair's query is either an uploaded query (query_id) or a gallery item (query_item)")
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
    return Pair(
        name, item_id, label, query, item, query_cells, item_cells, limit, gallery, query_id, query_item, posted
    )


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
