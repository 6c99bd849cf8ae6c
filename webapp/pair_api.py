"""JSON API of query ↔ result pairs: the cosine split per location, and its heatmaps.

``GET /api/pair?query=QID&item=ID[&index=NAME]``               cosine, label, both grids of contributions, URLs
``GET /api/heatmap?query=QID&item=ID[&index=NAME][&side=item]``  PNG heatmap of the item (or ``side=query``) side

``QID`` is the ``query_id`` of a search response; ``index`` defaults to the
gallery that search ran in. Instead of ``query=QID``, ``query_item=ID`` makes
another item of the gallery the query (``index`` then defaults to the default
gallery). Both sides share one colour scale.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from retrieval.heatmaps import render_heatmap
from webapp.api import item_json
from webapp.errors import ApiError, quoted
from webapp.pairs import Pair, requested_pair
from webapp.served import settings

pair_api = Blueprint("pair_api", __name__)
SIDES = ("item", "query")


@pair_api.get("/api/pair")
def pair():
    pair = requested_pair(settings(), request.args)
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


@pair_api.get("/api/heatmap")
def heatmap():
    side = request.args.get("side", "item")
    if side not in SIDES:
        raise ApiError(400, f"parameter 'side' must be one of {', '.join(SIDES)}, got {quoted(side)}")
    served = settings()
    pair = requested_pair(served, request.args)
    with served.metrics.timed("heatmap"):
        image, cells = (pair.item.image, pair.item_cells) if side == "item" else (pair.query.image, pair.query_cells)
        png = served.compute.run(render_heatmap, image, cells, pair.limit)
    return Response(png, mimetype="image/png")


def pair_urls(pair: Pair) -> dict[str, str]:
    """The URLs of a pair's two heatmaps and of its page."""
    names = {**pair.query_ref, "item": pair.item_id, "index": pair.index}
    return {
        "query_heatmap_url": url_for("pair_api.heatmap", **names, side="query"),
        "item_heatmap_url": url_for("pair_api.heatmap", **names, side="item"),
        "pair_url": url_for("pages.pair", **names),
    }
