"""Retrieval metrics: Recall@K, MAP@R and P@1 (Musgrave et al. 2020, "A Metric Learning Reality Check").

Neighbours come from exact inner-product search, done in chunks of queries so
memory stays O(chunk · depth) instead of the N × N similarity matrix. In
leave-one-out evaluation a query is removed from its own neighbours by its id,
not by dropping the first neighbour, because ties and duplicate images happen.

The gallery may also be a row source that is not in memory (``vectors[a:b]``,
``vectors[ids]``, ``shape``), such as ``Gallery.vectors()`` of an on-disk IVF
gallery. It is then read ``GALLERY_BLOCK_BYTES`` at a time, and each chunk's
top-k is merged across blocks, so evaluation works on galleries bigger than RAM.

``evaluate_per_query`` also returns each query's own results (first correct rank,
AP@R, R-precision, top K ids and scores) and a histogram of positive and negative
pair similarities (``retrieval.similarity_histogram``), still chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.similarity_histogram import HISTOGRAM_QUERIES, SimilarityHistogram, sample_queries, similarity_histogram

DEFAULT_CHUNK_SIZE = 8192
#: Gallery vectors read at once when the gallery is not an in-memory array.
GALLERY_BLOCK_BYTES = 1 << 28
#: Results (score + id, 12 bytes each) held per query chunk when the gallery is streamed: larger chunks mean
#: fewer passes over the gallery.
STREAMED_RESULT_BYTES = 1 << 28


def knn_exclude_self(
    gallery: np.ndarray,
    queries: np.ndarray,
    depth: int,
    query_ids: np.ndarray | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``depth`` inner-product neighbours: scores [M, D] float32 and ids [M, D] int64.

    With ``query_ids`` (each query's own row in ``gallery``) that row is left
    out of its results: the search goes one deeper and drops the entry whose
    id is the query's, or the last entry when the query is not among them
    (it can be pushed out by at least depth+1 exact duplicates). D is
    ``depth``, or fewer when the gallery is smaller. A gallery that is not an
    in-memory array and holds more than ``block_bytes`` (default
    ``GALLERY_BLOCK_BYTES``) is read a block at a time, once per chunk of queries.
    """
    faiss = _faiss()

    gallery = _rows(gallery)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    searched = search_depth(gallery, queries, depth, query_ids, chunk_size)
    rows_per_block = max(1, (block_bytes or GALLERY_BLOCK_BYTES) // (4 * gallery.shape[1]))
    if not _in_memory(gallery) and len(gallery) <= rows_per_block:  # small enough: read it whole
        gallery = np.ascontiguousarray(gallery[:], dtype=np.float32)
    exclude = query_ids is not None
    kept = searched - exclude
    scores = np.empty((len(queries), kept), dtype=np.float32)
    ids = np.empty((len(queries), kept), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        if _in_memory(gallery):
            chunk_scores, chunk_ids = faiss.knn(
                queries[start:stop], gallery, searched, metric=faiss.METRIC_INNER_PRODUCT
            )
        else:
            chunk_scores, chunk_ids = _knn_by_blocks(queries[start:stop], gallery, searched, rows_per_block)
        if exclude:
            chunk_scores, chunk_ids = drop_self(chunk_scores, chunk_ids, np.asarray(query_ids[start:stop]))
        scores[start:stop] = chunk_scores
        ids[start:stop] = chunk_ids
    return scores, ids


def _faiss():
    """The faiss module, imported here and not at the top: training imports these metrics on machines without
    FAISS (on CUDA it searches with ``training.knn.TorchKnn``). Its absence is an ImportError naming it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f"exact search on the CPU needs FAISS (the faiss-cpu package), which cannot be imported: {error}; "
            "install it, or pass another knn (training evaluates on CUDA with training.knn.TorchKnn)"
        ) from error
    return faiss


def _in_memory(vectors) -> bool:
    return isinstance(vectors, np.ndarray) and not isinstance(vectors, np.memmap)


def _rows(vectors):
    """A contiguous float32 array of ``vectors``, unless they are a row source to stream (a memmap, or an object
    with ``shape`` and slicing that is not an array, like ``Gallery.vectors()``)."""
    if isinstance(vectors, np.memmap) or (hasattr(vectors, "shape") and not isinstance(vectors, np.ndarray)):
        return vectors
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _knn_by_blocks(queries: np.ndarray, gallery, searched: int, rows_per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn against each block of ``gallery`` in turn, the top ``searched`` merged (faiss.ResultHeap)."""
    faiss = _faiss()

    heap = faiss.ResultHeap(len(queries), searched, keep_max=True)
    for offset in range(0, len(gallery), rows_per_block):
        block = np.ascontiguousarray(gallery[offset : offset + rows_per_block], dtype=np.float32)
        block_scores, block_ids = faiss.knn(
            queries, block, min(searched, len(block)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(block_scores, block_ids + offset)
    heap.finalize()
    return heap.D, heap.I


def search_depth(
    gallery: np.ndarray, queries: np.ndarray, depth: int, query_ids: np.ndarray | None, chunk_size: int
) -> int:
    """Check a kNN call's arguments; the neighbours to search: one more than ``depth`` when the query's own row
    is to be dropped, at most the gallery."""
    if len(gallery.shape) != 2 or queries.ndim != 2 or gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery [N, d] and queries [M, d] must agree on d, got {gallery.shape} and {queries.shape}")
    if depth < 1 or chunk_size < 1:
        raise ValueError(f"depth and chunk_size must be at least 1, got {depth} and {chunk_size}")
    if query_ids is not None and len(query_ids) != len(queries):
        raise ValueError(f"{len(query_ids)} query ids for {len(queries)} queries")
    return min(depth + (query_ids is not None), len(gallery))


def drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove exactly one entry per row: the query's own id, else the last (ids are unique within a row)."""
    drop = ids == self_ids[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    rows = len(ids)
    return scores[keep].reshape(rows, -1), ids[keep].reshape(rows, -1)


@dataclass(frozen=True)
class _LabelSet:
    """One labelling of gallery and queries (e.g. instance, or Hotels-50K chain) to score against."""

    prefix: str  # "" for the main labels, "chain_" etc. for extra ones
    names: np.ndarray  # the distinct labels of gallery and queries, sorted: code i is names[i]
    gallery_codes: np.ndarray  # int [N]
    query_codes: np.ndarray  # int [M]
    relevant: np.ndarray  # R: gallery items with the query's label, the query itself excluded [M]
    ks: tuple[int, ...]
    with_map: bool  # MAP@R and P@1 are reported for the main labels only


@dataclass(frozen=True, eq=False)
class PerQuery:
    """Each evaluated query's results (main labels), in query order: what ``evaluate_per_query`` adds."""

    rows: np.ndarray  # int64 [M]: the query's position among the queries (its gallery row in leave-one-out)
    label: np.ndarray  # int64 [M]: index into label_names
    label_names: np.ndarray  # [L] the distinct labels of gallery and queries
    first_correct_rank: np.ndarray  # int32 [M]: 1-based rank of the first correct neighbour, 0 = none within depth
    relevant: np.ndarray  # int64 [M]: R
    ap_at_r: np.ndarray  # float64 [M]
    r_precision: np.ndarray  # float64 [M]: correct neighbours among the top R, over R
    top_ids: np.ndarray  # int64 [M, K]: -1 where the gallery has fewer than K others
    top_scores: np.ndarray  # float32 [M, K]: NaN where top_ids is -1
    depth: int  # neighbours searched per query
    histogram: SimilarityHistogram


def evaluate(
    gallery_emb: np.ndarray,
    gallery_labels: Sequence | np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    query_emb: np.ndarray | None = None,
    query_labels: Sequence | np.ndarray | None = None,
    *,
    extra_labels: Mapping[str, tuple[Sequence | np.ndarray, Sequence | np.ndarray | None, Sequence[int]]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    knn: Callable[..., tuple[np.ndarray, np.ndarray]] = knn_exclude_self,
) -> dict[str, float | int]:
    """Recall@k for each k, MAP@R and P@1 of unit embeddings, by exact search.

    Without ``query_emb`` every gallery item is a query against the others
    (leave-one-out). Queries whose label has no other gallery item are left
    out and counted as "skipped". ``extra_labels`` maps a name to (gallery
    labels, query labels or None in leave-one-out, ks) and adds
    "<name>_recall@k", "<name>_queries" and "<name>_skipped", e.g. Hotels-50K
    chains: ``{"chain": (gallery_chain, query_chain, (1, 3, 5))}``.

    ``knn`` does the exact search, with ``knn_exclude_self``'s signature and
    contract: FAISS on the CPU by default; training passes a GPU search
    (``training.knn.TorchKnn``) when it runs on CUDA.
    """
    results, _ = _evaluate(
        gallery_emb, gallery_labels, ks, query_emb, query_labels, extra_labels, chunk_size, knn, top=None
    )
    return results


def evaluate_per_query(
    gallery_emb: np.ndarray,
    gallery_labels: Sequence | np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    query_emb: np.ndarray | None = None,
    query_labels: Sequence | np.ndarray | None = None,
    *,
    top: int = 10,
    extra_labels: Mapping[str, tuple[Sequence | np.ndarray, Sequence | np.ndarray | None, Sequence[int]]] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    knn: Callable[..., tuple[np.ndarray, np.ndarray]] = knn_exclude_self,
    histogram_queries: int = HISTOGRAM_QUERIES,
    seed: int = 0,
) -> tuple[dict[str, float | int], PerQuery]:
    """``evaluate``'s results, and each evaluated query's own: its first correct rank, R, AP@R, R-precision
    and ``top`` nearest gallery ids and scores (``PerQuery``).

    The search goes at least ``top`` deep; only each chunk's neighbours are held, never all the
    similarities. The similarity histogram covers ``histogram_queries`` of the evaluated queries (a
    random sample with ``seed`` when there are more) against the whole gallery.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    results, per_query = _evaluate(
        gallery_emb,
        gallery_labels,
        ks,
        query_emb,
        query_labels,
        extra_labels,
        chunk_size,
        knn,
        top=top,
        histogram_queries=histogram_queries,
        seed=seed,
    )
    assert per_query is not None
    return results, per_query


def _evaluate(
    gallery_emb: np.ndarray,
    gallery_labels: Sequence | np.ndarray,
    ks: Sequence[int],
    query_emb: np.ndarray | None,
    query_labels: Sequence | np.ndarray | None,
    extra_labels: Mapping[str, tuple[Sequence | np.ndarray, Sequence | np.ndarray | None, Sequence[int]]] | None,
    chunk_size: int,
    knn: Callable[..., tuple[np.ndarray, np.ndarray]],
    *,
    top: int | None,
    histogram_queries: int = HISTOGRAM_QUERIES,
    seed: int = 0,
) -> tuple[dict[str, float | int], PerQuery | None]:
    """The metrics, and with ``top`` the per-query results too."""
    leave_one_out = query_emb is None
    if leave_one_out != (query_labels is None):
        raise ValueError("give query_emb and query_labels together, or neither for leave-one-out")
    gallery_emb = _rows(gallery_emb)
    queries = gallery_emb if leave_one_out else np.ascontiguousarray(query_emb, dtype=np.float32)
    query_labels = gallery_labels if leave_one_out else query_labels
    sizes = (len(gallery_emb), len(queries))
    label_sets = [_label_set("", gallery_labels, query_labels, ks, sizes, leave_one_out, with_map=True)]
    for name, (gallery_extra, query_extra, extra_ks) in (extra_labels or {}).items():
        query_extra = gallery_extra if leave_one_out else query_extra
        if query_extra is None:
            raise ValueError(f"extra labels {name!r} need query labels when queries are given")
        label_sets.append(
            _label_set(f"{name}_", gallery_extra, query_extra, extra_ks, sizes, leave_one_out, with_map=False)
        )

    evaluated = [label_set.relevant > 0 for label_set in label_sets]
    for label_set, mask in zip(label_sets, evaluated):
        if not mask.any():
            kind = label_set.prefix.rstrip("_") or "label"
            raise ValueError(f"no query has another gallery item with the same {kind}; nothing to evaluate")
    main = label_sets[0]
    depth = max(max(max(s.ks) for s in label_sets), int(main.relevant.max()), top or 0)
    first_hit = [np.full(len(queries), np.inf) for _ in label_sets]  # rank (0-based) of the first correct neighbour
    average_precision = np.zeros(len(queries))
    collector = _PerQueryCollector(evaluated[0], top) if top else None
    searched = np.flatnonzero(np.logical_or.reduce(evaluated))
    if not _in_memory(gallery_emb):  # each chunk reads the whole gallery: make chunks as large as memory allows
        chunk_size = max(chunk_size, STREAMED_RESULT_BYTES // (12 * (depth + 1)))
    for start in range(0, len(searched), chunk_size):
        rows = searched[start : start + chunk_size]
        scores, ids = knn(
            gallery_emb, queries[rows], depth, query_ids=rows if leave_one_out else None, chunk_size=chunk_size
        )
        for label_set, ranks in zip(label_sets, first_hit):
            hits = label_set.gallery_codes[ids] == label_set.query_codes[rows, None]
            ranks[rows] = np.where(hits.any(axis=1), hits.argmax(axis=1), np.inf)
            if label_set.with_map:
                relevant = label_set.relevant[rows]
                scored = relevant > 0
                average_precision[rows[scored]] = _average_precision_at_r(hits[scored], relevant[scored])
                if collector is not None:
                    collector.add(rows[scored], hits[scored], relevant[scored], scores[scored], ids[scored])

    results: dict[str, float | int] = {}
    for label_set, ranks, mask in zip(label_sets, first_hit, evaluated):
        for k in label_set.ks:
            results[f"{label_set.prefix}recall@{k}"] = float(np.mean(ranks[mask] < k))
        if label_set.with_map:
            results["map@r"] = float(np.mean(average_precision[mask]))
            results["precision@1"] = float(np.mean(ranks[mask] < 1))
        results[f"{label_set.prefix}queries"] = int(mask.sum())
        results[f"{label_set.prefix}skipped"] = int((~mask).sum())
    if collector is None:
        return results, None
    kept = collector.rows
    sample = kept[sample_queries(len(kept), histogram_queries, seed)]
    histogram = similarity_histogram(
        gallery_emb,
        main.gallery_codes,
        queries[sample],
        main.query_codes[sample],
        query_ids=sample if leave_one_out else None,
    )
    per_query = PerQuery(
        rows=kept,
        label=main.query_codes[kept],
        label_names=main.names,
        first_correct_rank=np.where(np.isfinite(first_hit[0][kept]), first_hit[0][kept] + 1, 0).astype(np.int32),
        relevant=main.relevant[kept],
        ap_at_r=average_precision[kept],
        r_precision=collector.r_precision,
        top_ids=collector.top_ids,
        top_scores=collector.top_scores,
        depth=min(depth, len(gallery_emb) - leave_one_out),
        histogram=histogram,
    )
    return results, per_query


class _PerQueryCollector:
    """Fills the per-query arrays of the evaluated queries (``mask``) chunk by chunk, keeping ``top`` results."""

    def __init__(self, mask: np.ndarray, top: int) -> None:
        self.rows = np.flatnonzero(mask)
        self.slots = np.cumsum(mask) - 1  # query position -> row of the arrays
        self.r_precision = np.zeros(len(self.rows))
        self.top_ids = np.full((len(self.rows), top), -1, dtype=np.int64)
        self.top_scores = np.full((len(self.rows), top), np.nan, dtype=np.float32)

    def add(
        self, rows: np.ndarray, hits: np.ndarray, relevant: np.ndarray, scores: np.ndarray, ids: np.ndarray
    ) -> None:
        slots = self.slots[rows]
        within_r = np.arange(1, hits.shape[1] + 1) <= relevant[:, None]
        self.r_precision[slots] = (hits & within_r).sum(axis=1) / relevant
        kept = min(self.top_ids.shape[1], ids.shape[1])
        self.top_ids[slots, :kept] = ids[:, :kept]
        self.top_scores[slots, :kept] = scores[:, :kept]


def _label_set(
    prefix: str,
    gallery_labels: Sequence | np.ndarray,
    query_labels: Sequence | np.ndarray,
    ks: Sequence[int],
    sizes: tuple[int, int],
    leave_one_out: bool,
    *,
    with_map: bool,
) -> _LabelSet:
    """Encode both label arrays as shared integer codes and count R per query."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be at least 1, got {list(ks)}")
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    if (len(gallery_labels), len(query_labels)) != sizes:
        raise ValueError(
            f"{prefix}labels: {len(gallery_labels)} for {sizes[0]} gallery embeddings and "
            f"{len(query_labels)} for {sizes[1]} queries"
        )
    names, codes = np.unique(np.concatenate([gallery_labels, query_labels]), return_inverse=True)
    gallery_codes, query_codes = codes[: len(gallery_labels)], codes[len(gallery_labels) :]
    relevant = np.bincount(gallery_codes, minlength=codes.max() + 1)[query_codes] - int(leave_one_out)
    return _LabelSet(prefix, names, gallery_codes, query_codes, relevant, ks, with_map)


def _average_precision_at_r(hits: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """AP@R per row: (1/R) Σ_{i≤R} P(i)·rel(i), P(i) the precision of the top i; hits [M, D ≥ R]."""
    ranks = np.arange(1, hits.shape[1] + 1)
    correct_within_r = hits & (ranks <= relevant[:, None])
    precision = np.cumsum(correct_within_r, axis=1) / ranks
    return (precision * correct_within_r).sum(axis=1) / relevant


def mean_pairwise_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine over ordered pairs of distinct unit vectors, from the norm of their sum."""
    count = len(embeddings)
    if count < 2:
        return float("nan")
    total = embeddings.astype(np.float64).sum(axis=0)
    squared_norms = (embeddings.astype(np.float64) ** 2).sum()
    return float((total @ total - squared_norms) / (count * (count - 1)))
