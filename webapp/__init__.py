"""The web app: a search page and a JSON API over one or more gallery folders.

``create_app`` is the app factory, for ``sct serve`` and for WSGI servers::

    gunicorn -w 2 -k webapp.server.SlowClientSafeWorker --keep-alive 5 --no-control-socket \
        -b 127.0.0.1:5000 'webapp:create_app(["index_data/NAME"])'

(webapp.server says why that worker). Nothing here imports torch; a serving
host needs onnxruntime, faiss, flask, gunicorn, gevent, prometheus_client, pillow and numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from flask import Flask

from webapp.api import api
from webapp.cache import LruCache
from webapp.compute import ComputePool
from webapp.errors import FORM_OVERHEAD_BYTES, drain_refused_bodies, register_error_handlers
from webapp.eval_browser import eval_browser
from webapp.metrics import Metrics, count_requests
from webapp.pages import pages
from webapp.pair_api import pair_api
from webapp.query_store import QueryStore, default_query_store
from webapp.security import install_security
from webapp.served import DEFAULT_MAX_BATCH, SearchSettings, load_indexes

MiB = 1 << 20
#: The text fields a search form may have besides its images (k, index, item and the filters, some repeated);
#: werkzeug parses every part before a handler runs, so a request of thousands of parts is refused (413) up front.
MAX_TEXT_PARTS = 32
#: The form parts a search may have with the default ``max_batch``.
MAX_FORM_PARTS = DEFAULT_MAX_BATCH + MAX_TEXT_PARTS
#: The largest text field kept in memory. Werkzeug's multipart decoder counts against this limit its whole buffer:
#: the next 64 KiB read plus the bytes of a file part held back because they might begin a boundary (up to a
#: boundary line, at most 8 KiB behind gunicorn's header limit). At 64 KiB, the limit refused every upload whose
#: bytes happened to put a CR or LF near the end of a read: most photos over a megabyte.
MAX_FORM_FIELD_BYTES = 256 << 10


def create_app(
    index_dirs: Sequence[str | os.PathLike[str]],
    *,
    max_upload_bytes: int = 16 * MiB,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_batch_bytes: int | None = None,
    default_k: int = 10,
    max_k: int = 100,
    max_pixels: int = 40_000_000,
    kept_queries: int = 128,
    query_ttl_s: float = 15 * 60,
    cached_items: int = 64,
    query_store: str | os.PathLike[str] | None = None,
    query_store_bytes: int = 256 * MiB,
    query_store_age_s: float = 24 * 3600,
    allowed_hosts: Sequence[str] = (),
    compute_slots: int = 2,
    providers: Sequence[str] | None = None,
) -> Flask:
    """Build the Flask app serving the galleries in ``index_dirs``; the first is the default.

    Each gallery is named after its folder. Loading fails (FileNotFoundError,
    retrieval.gallery.GalleryMismatchError, ValueError) before any request is
    served when a gallery is missing or inconsistent. Afterwards each gallery
    follows its folder being rebuilt (webapp.live). The uploaded images of
    searches go to the folder ``query_store`` (default: webapp.query_store's
    default_query_store, shared by the servers of one user on one machine), at
    most ``query_store_bytes`` of them, each for ``query_store_age_s`` seconds,
    so that any worker of any server reading that folder draws their heatmaps.
    Each worker also keeps the views of its latest ``kept_queries`` searches
    for ``query_ttl_s`` seconds, and of ``cached_items`` gallery items. At most
    ``compute_slots`` requests decode, embed or draw at once (webapp.compute). Requests must name
    the server by an IP address, localhost, the machine's name or one of
    ``allowed_hosts`` (webapp.security). A search may send up to ``max_batch`` images of up to
    ``max_upload_bytes`` each and ``max_batch_bytes`` (default: ``BATCH_UPLOADS`` × ``max_upload_bytes``, webapp.served) together.
    The galleries' models run on ONNX Runtime's execution ``providers`` (None: CUDA when it has it, else the CPU).
    """
    if not 1 <= default_k <= max_k:
        raise ValueError(f"default_k must be between 1 and max_k = {max_k}, got {default_k}")
    app = Flask(__name__)
    metrics = Metrics()
    compute = ComputePool(compute_slots)
    served = app.extensions["sct"] = SearchSettings(
        indexes=load_indexes(index_dirs, compute, providers),
        default_k=default_k,
        max_k=max_k,
        max_pixels=max_pixels,
        max_upload_bytes=max_upload_bytes,
        max_batch=max_batch,
        max_batch_bytes=max_batch_bytes,
        queries=LruCache(kept_queries, query_ttl_s),
        query_store=QueryStore(
            default_query_store() if query_store is None else query_store,
            max_bytes=query_store_bytes,
            max_age_s=query_store_age_s,
        ),
        item_views=LruCache(cached_items, query_ttl_s),
        metrics=metrics,
        compute=compute,
    )
    metrics.track_size("queries_kept", "searches kept for their heatmaps", lambda: len(served.queries))
    metrics.track_size("item_views_cached", "gallery items embedded for heatmaps", lambda: len(served.item_views))
    app.config["MAX_CONTENT_LENGTH"] = served.max_batch_bytes + FORM_OVERHEAD_BYTES
    app.config["MAX_FORM_PARTS"] = max_batch + MAX_TEXT_PARTS
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_FORM_FIELD_BYTES
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(pair_api)
    app.register_blueprint(eval_browser)
    register_error_handlers(app)
    drain_refused_bodies(app)
    count_requests(app, metrics)
    install_security(app, allowed_hosts)
    return app


__all__ = ["create_app"]
