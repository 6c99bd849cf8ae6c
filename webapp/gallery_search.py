"""Searching a served gallery's FAISS index in a request: with one OpenMP thread, by an embedded query or by the
stored vector of one of its own items ("more like this").

An item search needs no image and no model run: the item's vector is read back
from the index (``Gallery.vectors``, as ``sct eval`` reads it; for IVF-PQ its
quantised reconstruction) and searched like an uploaded query's, and the item
itself is left out of its results.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

from retrieval.filters import SearchFilter
from retrieval.gallery import Gallery
from retrieval.rerank import rerank_search

#: The first read of stored vectors builds an IVF index's id → list map; other requests wait for it.
_stored_lock = threading.Lock()


def search_one_thread(
    gallery: Gallery, queries: np.ndarray, k: int, filter: SearchFilter | None = None, rerank: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """``gallery.search`` with one OpenMP thread in this request thread, re-ranked by ``rerank``
    (retrieval.rerank; not with a filter, which ``check_rerank`` refuses first).

    FAISS spreads even a single query over every core with OpenMP. On a server
    the other cores are busy (ONNX Runtime, other requests), and waiting for
    those threads made one search of 10,000 × 512 take about 16 ms instead of
    0.4 ms (benchmarks/results/search_latency.md). OpenMP's thread count is a
    per-thread setting, restored afterwards.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        if rerank != "none":
            return rerank_search(gallery, queries, k, rerank)
        return gallery.search(queries, k, filter)
    finally:
        faiss.omp_set_num_threads(previous)


def stored_vector(gallery: Gallery, item_id: int) -> np.ndarray:
    """The vector [1, d] that the gallery's index holds for item ``item_id`` (an item of the gallery)."""
    with _stored_lock:
        gallery.vectors()
    return gallery.vectors_of(np.array([item_id], dtype=np.int64))


def search_like_item(
    gallery: Gallery, item_id: int, k: int, filter: SearchFilter | None = None, rerank: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` items nearest to item ``item_id``'s stored vector among those ``filter`` allows, best first, the
    item itself left out: scores [k'] and ids [k'], k' <= k (fewer when the gallery is smaller or an approximate
    index finds fewer). Runs in a compute slot (webapp.compute)."""
    scores, ids = search_one_thread(gallery, stored_vector(gallery, item_id), k + 1, filter, rerank)
    keep = (ids[0] != item_id) & (ids[0] >= 0)  # FAISS pads with -1 when an approximate index finds fewer
    return scores[0][keep][:k], ids[0][keep][:k]
