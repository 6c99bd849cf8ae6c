"""The HTML pages (server-rendered): search (static/app.js calls the JSON API), pair view, evaluation."""

from __future__ import annotations

from flask import Blueprint, render_template, request, url_for

from webapp.eval_browser import evaluation_section
from webapp.evaluation import manifest_rows, read_eval, recall_curves, summary_rows
from webapp.pair_api import pair_urls
from webapp.pairs import requested_pair
from webapp.served import settings

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    served = settings()
    return render_template(
        "index.html",
        indexes=[(name, len(live.current().items)) for name, live in served.indexes.items()],
        default_k=served.default_k,
        max_k=served.max_k,
        max_upload_bytes=served.max_upload_bytes,
    )


@pages.get("/pair")
def pair():
    pair = requested_pair(settings(), request.args)
    query_item = pair.query_item
    return render_template(
        "pair.html",
        pair=pair,
        item_image_url=url_for("api.item_image", item_id=pair.item_id, index=pair.index),
        query_label=None if query_item is None else pair.gallery.item(query_item).label,
        query_image_url=None if query_item is None else url_for("api.item_image", item_id=query_item, index=pair.index),
        **pair_urls(pair),
    )


@pages.get("/evaluation")
def evaluation():
    served = settings()
    name, gallery = served.gallery(request.args.get("index"), unknown_status=404)
    try:
        results, problem = read_eval(served.indexes[name].directory), None
    except ValueError as exc:
        results, problem = None, str(exc)
    return render_template(
        "evaluation.html",
        name=name,
        names=list(served.indexes),
        model_sha256=gallery.manifest["model_sha256"],
        facts=manifest_rows(gallery.manifest),
        results=results,
        curves=recall_curves(results) if results else [],
        summary=summary_rows(results) if results else [],
        problem=problem,
        queries=evaluation_section(name, gallery, evaluated=results is not None),
    )
