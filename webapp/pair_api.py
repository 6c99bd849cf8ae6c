"""JSON API of query ↔ result pairs: the cosine split per location, and its heatmaps.

``GET /api/pair?query=QID&item=ID[&index=NAME]``               cosine, label, both grids of contributions, URLs
``GET /api/heatmap?query=QID&item=ID[&index=NAME][&side=item]``  PNG heatmap of the item (or ``side=query``) side
``POST /api/pair``, ``POST /api/heatmap``                      the same for the image in the multipart file field
                                                               ``image``, with ``item``, ``index``, ``side`` fields

``QID`` is the ``query_id`` of a search response: any worker of any server
that shares the search's query store answers it (webapp.pairs). Instead of
``query=QID``, ``query_item=ID`` makes another item of the gallery the query;
a POST sends the query image itself, which nothing keeps. ``index`` defaults
to the default gallery. Both sides share one colour scale.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Blueprint, Response, jsonify, request, url_for

from retrieval.heatmaps import render_heatmap
from webapp.api import item_json
from webapp.errors import ApiError, quoted
from webapp.pairs import Pair, requested_pair
from webapp.served import SearchSettings, settings
from webapp.uploads import one_upload

pair_api = Blueprint("pair_api", __name__)
SIDES = ("item", "query")


@pair_api.route("/api/pair", methods=["GET", "POST"])
def pair():
    pair = requested_pair_of(settings())
    gallery = pair.gallery
    return jsonify(
        query_id=pair.query_id,
        query_item=None if pair.query_item is None else item_json(pair.index, gallery, pair.query_item),
        index=pair.index,
        item=item_json(pair.index, gallery, pair.item_id),
        cosine=pair.cosine,
        query_cells=pair.query_cells.tolist(),
        item_cells=pair.item_cells.tolist(),
        scale=pair.limit,
        **pair_urls(pair),
    )


@pair_api.route("/api/heatmap", methods=["GET", "POST"])
def heatmap():
    side = parameters().get("side", "item")
    if side not in SIDES:
        raise ApiError(400, f"parameter 'side' must be one of {', '.join(SIDES)}, got {quoted(side)}")
    served = settings()
    pair = requested_pair_of(served)
    with served.metrics.timed("heatmap"):
        image, cells = (pair.item.image, pair.item_cells) if side == "item" else (pair.query.image, pair.query_cells)
        png = served.compute.run(render_heatmap, image, cells, pair.limit)
    return Response(png, mimetype="image/png")


def parameters() -> Mapping[str, str]:
    """The request's parameters: its form fields in a POST, else its query string."""
    return request.form if request.method == "POST" else request.args


def requested_pair_of(served: SearchSettings) -> Pair:
    """The pair the request names; in a POST, of the image in its file field ``image``."""
    if request.method != "POST":
        return requested_pair(served, request.args)
    return requested_pair(served, request.form, one_upload(request.files.getlist("image"), served.max_upload_bytes))


def pair_urls(pair: Pair) -> dict[str, str | None]:
    """The URLs of a pair's two heatmaps and of its page; None for a query posted with the request, which no
    URL can name."""
    if pair.posted:
        return dict.fromkeys(("query_heatmap_url", "item_heatmap_url", "pair_url"))
    names = {**pair.query_ref, "item": pair.item_id, "index": pair.index}
    return {
        "query_heatmap_url": url_for("pair_api.heatmap", **names, side="query"),
        "item_heatmap_url": url_for("pair_api.heatmap", **names, side="item"),
        "pair_url": url_for("pages.pair", **names),
    }
