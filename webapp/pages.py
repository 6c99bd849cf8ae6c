"""The search page (server-rendered; static/app.js calls the JSON API)."""

from __future__ import annotations

from flask import Blueprint, render_template

from webapp.served import settings

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    served = settings()
    return render_template(
        "index.html",
        indexes=[(name, len(gallery.items)) for name, gallery in served.indexes.items()],
        default_k=served.default_k,
        max_k=served.max_k,
        max_upload_bytes=served.max_upload_bytes,
    )
