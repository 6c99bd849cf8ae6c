"""How similar positive and negative pairs are: histograms of the cosine of (query, gallery item) pairs.

Every pair of a bounded number of queries (a seeded random sample when there are more) with the whole
gallery is counted, the gallery read a block at a time, so memory stays bounded however large it is.
Similarities are computed in float64 and clipped to [-1, 1] before binning, so every pair lands in a bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Queries the histogram covers at most: bounded work on any gallery.
HISTOGRAM_QUERIES = 2000
HISTOGRAM_BINS = 100
#: Bytes of similarities (and their masks) held at once.
HISTOGRAM_BLOCK_BYTES = 1 << 26


@dataclass(frozen=True, eq=False)
class SimilarityHistogram:
    edges: np.ndarray  # float64 [B + 1], over [-1, 1]
    positive: np.ndarray  # int64 [B]: pairs with the same label, a query with itself never counted
    negative: np.ndarray  # int64 [B]: pairs with different labels
    queries: int  # how many queries the counts cover


def sample_queries(count: int, limit: int = HISTOGRAM_QUERIES, seed: int = 0) -> np.ndarray:
    """Positions of the queries to histogram: all ``count`` when at most ``limit``, else ``limit`` of them drawn
    at random with ``seed``, in increasing order."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def similarity_histogram(
    gallery,
    gallery_codes: np.ndarray,
    queries: np.ndarray,
    query_codes: np.ndarray,
    query_ids: np.ndarray | None = None,
    *,
    bins: int = HISTOGRAM_BINS,
    block_bytes: int | None = None,
) -> SimilarityHistogram:
    """Count each (query, gallery item) pair's cosine by whether their label codes agree.

    ``gallery`` is an array or a row source (``gallery[a:b]``, ``shape``); ``queries`` [H, d] are all held.
    With ``query_ids`` (each query's own row in the gallery, leave-one-out) a query's pair with itself is
    not counted. About ``block_bytes`` (default ``HISTOGRAM_BLOCK_BYTES``) of similarities are held at once.
    """
    queries = np.asarray(queries, dtype=np.float64)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    positive = np.zeros(bins, dtype=np.int64)
    negative = np.zeros(bins, dtype=np.int64)
    count, dim = gallery.shape
    rows_per_block = max(1, (block_bytes or HISTOGRAM_BLOCK_BYTES) // (18 * len(queries) + 8 * dim))
    for start in range(0, count, rows_per_block):
        stop = min(start + rows_per_block, count)
        similarities = queries @ np.asarray(gallery[start:stop], dtype=np.float64).T
        np.clip(similarities, -1.0, 1.0, out=similarities)
        same = query_codes[:, None] == gallery_codes[None, start:stop]
        positive += np.histogram(similarities[same], bins=bins, range=(-1.0, 1.0))[0]
        negative += np.histogram(similarities[~same], bins=bins, range=(-1.0, 1.0))[0]
        if query_ids is not None:  # a query with itself: same label, counted above, taken out again
            own = np.flatnonzero((query_ids >= start) & (query_ids < stop))
            positive -= np.histogram(similarities[own, query_ids[own] - start], bins=bins, range=(-1.0, 1.0))[0]
    return SimilarityHistogram(edges, positive, negative, len(queries))
