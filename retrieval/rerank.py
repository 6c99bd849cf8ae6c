"""Re-ranking of search results: k-reciprocal encoding, α-query expansion and database-side augmentation.

``k-reciprocal`` (Zhong et al., CVPR 2017) re-orders each query's top ``candidates`` gallery items by
``(1 - λ)·J + λ·d``: d = (1 - cos)/2 is the original distance and J the Jaccard distance between the
k-reciprocal encodings of query and item. Over the points U = gallery ∪ {query}, with N(x, k) = x and its k
nearest other points:

- R(x, k) = {y ∈ N(x, k) : x ∈ N(y, k)}, the k-reciprocal neighbours;
- R*(x) = R(x, k1) ∪ R(c, h) for each c ∈ R(x, k1) with more than 2/3 of R(c, h) inside R(x, k1), h = ⌈k1/2⌉;
- V(x) puts weight exp(-d(x, y)) on each y ∈ R*(x), normalised to sum 1, and is then averaged over
  N(x, k2 - 1) (local query expansion);
- J(q, g) = 1 - Σ min(V(q), V(g)) / Σ max(V(q), V(g)).

Memory stays bounded: there is no N × N (or queries × N) matrix. Only the encodings of the query, its candidates
and the points they reach within a few neighbour hops are built, as sparse (ids, weights) pairs, from each point's
k1 nearest neighbours; those lists are searched in the gallery index a block of points at a time and kept for
later queries (O(N·k1) at most). Items below the candidates keep their original order after them, scored as if
J = 1, which keeps the scores descending. In leave-one-out evaluation the query is its own gallery item, so
U is the gallery and the query is removed from its results (the same as searching it against the gallery
without it).

``qe`` (α-query expansion, Radenović et al.): the query is replaced by the normalised sum of itself and its top
``n`` neighbours weighted by max(similarity, 0)^α, and searched again.

``dba`` (database-side augmentation): each gallery vector is replaced by the normalised sum of itself and its top
``n`` other items weighted by max(similarity, 0)^α; queries are searched as they are against these vectors. The
transformed vectors are built a block of items at a time. In leave-one-out evaluation an item whose
augmentation drew on the query is scored with the augmentation it has without the query.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import UserValueError
from retrieval.metrics import drop_self, knn_exclude_self

METHODS = ("none", "k-reciprocal", "qe", "dba")
#: Why a search is not both filtered and re-ranked: re-ranking draws on the whole gallery's neighbourhoods.
RERANK_WITH_FILTER = "a search is either filtered or re-ranked (re-ranking reads the whole gallery's neighbours)"
#: Points whose neighbours are searched in the gallery index at once.
BLOCK = 4096
#: The query's id among the points of U when it is not a gallery item (gallery ids are ≥ 0, -1 pads).
QUERY = -2


@dataclass(frozen=True)
class RerankParams:
    """A re-ranking method and its parameters (those of other methods are ignored)."""

    method: str = "none"
    k1: int = 20
    k2: int = 6
    lam: float = 0.3
    candidates: int = 100
    alpha: float = 3.0
    n: int = 10

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserValueError(f"unknown re-ranking method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("k1", "k2", "candidates", "n"):
            if int(getattr(self, name)) < 1:
                raise UserValueError(f"re-ranking {name} must be at least 1, got {getattr(self, name)}")
        if self.k2 > self.k1 + 1:
            raise UserValueError(f"re-ranking k2 ({self.k2}) must be at most k1 + 1 ({self.k1 + 1})")
        if not 0.0 <= self.lam <= 1.0:
            raise UserValueError(f"re-ranking lambda must be within 0..1, got {self.lam}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise UserValueError(f"query expansion alpha must be a finite number ≥ 0, got {self.alpha}")

    def record(self) -> dict[str, Any]:
        """The method and the parameters it uses, for eval.json."""
        used = {"k-reciprocal": ("k1", "k2", "lam", "candidates"), "qe": ("alpha", "n"), "dba": ("alpha", "n")}
        values = asdict(self)
        return {"method": self.method, **{name: values[name] for name in used.get(self.method, ())}}


class VectorSource:
    """What re-ranking reads from a gallery: ``search(vectors, k)`` and ``vectors_of(ids)`` by id, and the ids."""

    def __init__(
        self,
        search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
        vectors_of: Callable[[np.ndarray], np.ndarray],
        count: int,
        ids: Callable[[], np.ndarray],
    ) -> None:
        self.search, self.vectors_of, self.count, self.ids = search, vectors_of, count, ids

    @classmethod
    def of_gallery(cls, gallery) -> VectorSource:
        """A ``retrieval.gallery.Gallery`` (item ids, its own index)."""
        return cls(gallery.search, gallery.vectors_of, len(gallery.items), lambda: gallery.items.ids)

    @classmethod
    def of_rows(cls, rows) -> VectorSource:
        """Gallery vectors [N, d] by row (an array or ``Gallery.vectors()``), searched exactly; ids are rows."""
        return cls(
            lambda queries, k: knn_exclude_self(rows, queries, k),
            lambda ids: np.asarray(rows[np.asarray(ids, dtype=np.int64)], dtype=np.float32),
            len(rows),
            lambda: np.arange(len(rows)),
        )


def _valid(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ids >= 0
    return scores[keep], ids[keep]


class _NeighbourLists:
    """Each gallery item's ``k`` nearest other items (ids and similarities, nearest first), searched in the index
    a block of items at a time and kept."""

    def __init__(self, source: VectorSource, k: int) -> None:
        self.source, self.k = source, k
        self.lists: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.encoder: _Encoder | None = None  # leave-one-out's, whose encodings hold for every query

    def fetch(self, ids) -> None:
        missing = np.array(sorted({int(i) for i in ids} - self.lists.keys()), dtype=np.int64)
        for start in range(0, len(missing), BLOCK):
            block = missing[start : start + BLOCK]
            vectors = np.ascontiguousarray(self.source.vectors_of(block), dtype=np.float32)
            scores, found = self.source.search(vectors, self.k + 1)
            scores, found = drop_self(scores, found, block)
            for item, row_scores, row_ids in zip(block.tolist(), scores, found):
                valid_scores, valid_ids = _valid(row_scores, row_ids)
                self.lists[item] = (valid_ids[: self.k], valid_scores[: self.k])


class _Encoder:
    """k-reciprocal encodings of the points of U = gallery ∪ {query}, built on demand and kept.

    ``query`` is None in leave-one-out (the query is a gallery item, U is the gallery); otherwise its vector,
    with id ``QUERY``, is inserted into the lists of the gallery items it is nearer to than their k1-th
    neighbour."""

    def __init__(self, lists: _NeighbourLists, k1: int, k2: int, query: np.ndarray | None = None) -> None:
        self.store, self.k1, self.k2, self.half = lists, k1, k2, (k1 + 1) // 2
        self.query = query
        self.neighbours: dict[int, tuple[int, ...]] = {}  # x and its k1 nearest, x first
        self.reciprocal: dict[tuple[int, int], tuple[int, ...]] = {}
        self.raw: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if query is not None:
            scores, ids = lists.source.search(query[None], k1)
            self.neighbours[QUERY] = (QUERY, *_valid(scores[0], ids[0])[1].tolist())

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of points of U by id (the query's is ``self.query``)."""
        gallery = ids != QUERY
        if gallery.all():
            return np.asarray(self.store.source.vectors_of(ids), dtype=np.float32)
        out = np.empty((len(ids), len(self.query)), dtype=np.float32)
        out[gallery] = self.store.source.vectors_of(ids[gallery])
        out[~gallery] = self.query
        return out

    def prepare(self, points: Sequence[int]) -> None:
        """Fetch the neighbour lists the encodings of ``points`` and their Jaccard distances read: those of the
        points, of their k2 nearest (whose raw encodings are averaged), of those points' k1 nearest (whose lists
        say who is k1-reciprocal) and of these points' h nearest (who is h-reciprocal)."""
        frontier = {int(p) for p in points}
        widths = (self.k2, self.k1 + 1, self.half + 1, 0)
        for width in widths:
            self._fetch(frontier)
            if width:
                frontier = {y for p in frontier for y in self.neighbours[p][:width]}

    def _fetch(self, points: set[int]) -> None:
        missing = [p for p in points if p not in self.neighbours]
        self.store.fetch(missing)
        if self.query is not None:
            self._insert_query(missing)
        for p in missing:
            if p not in self.neighbours:
                self.neighbours[p] = (p, *self.store.lists[p][0].tolist())

    def _insert_query(self, points: list[int]) -> None:
        """The lists over gallery ∪ {query} of ``points``: the query goes in where it is nearer than the k1-th."""
        if not points:
            return
        ids = np.array(points, dtype=np.int64)
        similarity = self.store.source.vectors_of(ids) @ self.query
        for point, query_similarity in zip(points, similarity.tolist()):
            others, scores = self.store.lists[point]
            if len(others) == self.k1 and query_similarity <= scores[-1]:
                continue
            place = int(np.sum(scores >= query_similarity))
            merged = [*others[:place].tolist(), QUERY, *others[place:].tolist()][: self.k1]
            self.neighbours[point] = (point, *merged)

    def _reciprocal(self, x: int, k: int) -> tuple[int, ...]:
        key = (x, k)
        if key not in self.reciprocal:
            self.reciprocal[key] = tuple(y for y in self.neighbours[x][: k + 1] if x in self.neighbours[y][: k + 1])
        return self.reciprocal[key]

    def _raw(self, x: int) -> tuple[np.ndarray, np.ndarray]:
        if x not in self.raw:
            near = self._reciprocal(x, self.k1)
            inside = set(near)
            expanded = set(near)
            for c in near:
                half = self._reciprocal(c, self.half)
                if 3 * sum(y in inside for y in half) > 2 * len(half):
                    expanded.update(half)
            ids = np.array(sorted(expanded), dtype=np.int64)
            vectors = self.vectors(np.array([x, *ids.tolist()], dtype=np.int64))
            distance = (1.0 - vectors[1:].astype(np.float64) @ vectors[0].astype(np.float64)) / 2
            weights = np.exp(-distance)
            self.raw[x] = (ids, weights / weights.sum())
        return self.raw[x]

    def encoding(self, x: int) -> tuple[np.ndarray, np.ndarray]:
        """V(x): the raw encodings of x and its k2 - 1 nearest, averaged: sorted ids and weights."""
        if x not in self.encoded:
            members = self.neighbours[x][: self.k2]
            parts = [self._raw(y) for y in members]
            ids, where = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
            weights = np.bincount(where, np.concatenate([p[1] for p in parts]), len(ids)) / len(members)
            self.encoded[x] = (ids, weights)
        return self.encoded[x]

    def jaccard(self, x: int, others: Sequence[int]) -> np.ndarray:
        """J(x, y) for each y of ``others``: 1 - Σ min / Σ max of their encodings."""
        ids, weights = self.encoding(x)
        parts = [self.encoding(y) for y in others]
        other_ids = np.concatenate([p[0] for p in parts])
        other_weights = np.concatenate([p[1] for p in parts])
        owner = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
        place = np.minimum(np.searchsorted(ids, other_ids), len(ids) - 1)
        shared = ids[place] == other_ids
        minimum = np.bincount(owner[shared], np.minimum(weights[place[shared]], other_weights[shared]), len(parts))
        totals = np.bincount(owner, other_weights, len(parts)) + weights.sum()
        return 1.0 - minimum / (totals - minimum)


def _k_reciprocal(
    source: VectorSource,
    lists: _NeighbourLists,
    queries: np.ndarray,
    depth: int,
    params: RerankParams,
    query_ids: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``depth`` of each query after k-reciprocal re-ranking of its top ``params.candidates``."""
    searched = min(max(depth, params.candidates), source.count - (query_ids is not None))
    if query_ids is None:
        scores, ids = source.search(queries, searched)
    else:
        scores, ids = source.search(queries, min(searched + 1, source.count))
        scores, ids = drop_self(scores, ids, np.asarray(query_ids, dtype=np.int64))
    kept = min(depth, ids.shape[1])
    out_scores = np.full((len(queries), kept), np.nan, dtype=np.float32)
    out_ids = np.full((len(queries), kept), -1, dtype=np.int64)
    shared = None
    if query_ids is not None:  # leave-one-out: U is the gallery, one encoder serves every query
        shared = lists.encoder or _Encoder(lists, params.k1, params.k2)
        lists.encoder = shared
        top = ids[:, : params.candidates]
        shared.prepare({*np.asarray(query_ids).tolist(), *top[top >= 0].tolist()})
    for row in range(len(queries)):
        row_scores, row_ids = _valid(scores[row], ids[row])
        candidates = row_ids[: params.candidates]
        if shared is None:
            encoder = _Encoder(lists, params.k1, params.k2, queries[row])
            encoder.prepare([QUERY, *candidates.tolist()])
        else:
            encoder = shared
        point = int(query_ids[row]) if query_ids is not None else QUERY
        distance = (1.0 - row_scores.astype(np.float64)) / 2
        final = params.lam * distance
        final[: len(candidates)] += (1 - params.lam) * encoder.jaccard(point, candidates.tolist())
        final[len(candidates) :] += 1 - params.lam
        order = np.argsort(final, kind="stable")[:kept]
        out_ids[row, : len(order)] = row_ids[order]
        out_scores[row, : len(order)] = 1.0 - final[order]
    return out_scores, out_ids


def _expand(vectors: np.ndarray, neighbours: np.ndarray, similarity: np.ndarray, alpha: float) -> np.ndarray:
    """Normalised ``vectors`` + Σ max(similarity, 0)^α · neighbour: rows [M, d], neighbours [M, n, d]."""
    weights = np.maximum(similarity, 0).astype(np.float64) ** alpha
    summed = vectors.astype(np.float64) + np.einsum("mn,mnd->md", weights, neighbours.astype(np.float64))
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return (summed / np.where(norms > 0, norms, 1)).astype(np.float32)


def _neighbour_vectors(source: VectorSource, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of ``ids`` [M, n] ([M, n, d]) and their similarities, zero where the id is a -1 pad."""
    valid = ids >= 0
    vectors = np.zeros((*ids.shape, 0), dtype=np.float32)
    if valid.any():
        found = source.vectors_of(ids[valid])
        vectors = np.zeros((*ids.shape, found.shape[1]), dtype=np.float32)
        vectors[valid] = found
    return vectors, np.where(valid, scores, 0)


def _query_expansion(
    source: VectorSource, queries: np.ndarray, depth: int, params: RerankParams, query_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """α-QE: search, expand each query with its top n, search again (without the query item in leave-one-out)."""
    out_scores, out_ids = [], []
    for start in range(0, len(queries), BLOCK):
        block = queries[start : start + BLOCK]
        own = None if query_ids is None else np.asarray(query_ids[start : start + BLOCK], dtype=np.int64)
        scores, ids = _search_without(source, block, params.n, own)
        neighbours, similarity = _neighbour_vectors(source, ids, scores)
        expanded = _expand(block, neighbours, similarity, params.alpha) if neighbours.shape[-1] else block
        scores, ids = _search_without(source, expanded, depth, own)
        out_scores.append(scores)
        out_ids.append(ids)
    return np.concatenate(out_scores), np.concatenate(out_ids)


def _search_without(
    source: VectorSource, queries: np.ndarray, depth: int, own: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``depth``, leaving each query's own item ``own`` out when given."""
    if own is None:
        return source.search(queries, min(depth, source.count))
    scores, ids = source.search(queries, min(depth + 1, source.count))
    return drop_self(scores, ids, own)


class _Augmented:
    """A gallery's DBA vectors, built a block of items at a time, with each item's top n + 1 others."""

    def __init__(self, source: VectorSource, params: RerankParams) -> None:
        import faiss

        self.source, self.params = source, params
        self.ids = np.asarray(source.ids(), dtype=np.int64)
        n = params.n
        self.index = faiss.IndexFlatIP(source.vectors_of(self.ids[:1]).shape[1])  # the augmented vectors
        self.neighbours = np.full((len(self.ids), n + 1), -1, dtype=np.int64)
        self.similarity = np.zeros((len(self.ids), n + 1), dtype=np.float32)
        for start in range(0, len(self.ids), BLOCK):
            block = self.ids[start : start + BLOCK]
            own = np.ascontiguousarray(source.vectors_of(block), dtype=np.float32)
            scores, found = _search_without(source, own, n + 1, block)
            self.neighbours[start : start + len(block), : found.shape[1]] = found
            self.similarity[start : start + len(block), : found.shape[1]] = np.where(found >= 0, scores, 0)
            neighbours, similarity = _neighbour_vectors(source, found[:, :n], scores[:, :n])
            self.index.add(_expand(own, neighbours, similarity, params.alpha) if neighbours.shape[-1] else own)
        # who drew on whom: the items whose top n holds a given item, for leave-one-out
        drawn = self.neighbours[:, :n].ravel()
        by_neighbour = np.argsort(drawn, kind="stable")
        self.reverse_rows = by_neighbour // n
        self.reverse_keys = drawn[by_neighbour]

    def search(self, queries: np.ndarray, depth: int, query_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if query_ids is None:
            scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(depth, len(self.ids)))
            return scores, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        return self._search_leave_one_out(queries, depth, np.asarray(query_ids, dtype=np.int64))

    def _search_leave_one_out(
        self, queries: np.ndarray, depth: int, query_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query against the DBA vectors, the items that drew on it re-augmented without it."""
        kept = min(depth, len(self.ids) - 1)
        out_scores = np.full((len(queries), kept), np.nan, dtype=np.float32)
        out_ids = np.full((len(queries), kept), -1, dtype=np.int64)
        n = self.params.n
        for row, (query, own) in enumerate(zip(queries, query_ids.tolist())):
            lo, hi = np.searchsorted(self.reverse_keys, [own, own + 1])
            drew = self.reverse_rows[lo:hi]
            searched = min(kept + 1 + len(drew), len(self.ids))
            scores, rows = self.index.search(np.ascontiguousarray(query[None], dtype=np.float32), searched)
            scores, rows = scores[0], rows[0]
            keep = (rows >= 0) & ~np.isin(rows, drew) & (self.ids[np.maximum(rows, 0)] != own)
            rows, scores = rows[keep], scores[keep]
            if len(drew):
                others = self.neighbours[drew]
                mask = others != own
                others = np.stack([o[m][:n] for o, m in zip(others, mask)])
                similarity = np.stack([s[m][:n] for s, m in zip(self.similarity[drew], mask)])
                neighbours, similarity = _neighbour_vectors(self.source, others, similarity)
                redone = _expand(self.source.vectors_of(self.ids[drew]), neighbours, similarity, self.params.alpha)
                rows = np.concatenate([rows, drew])
                scores = np.concatenate([scores, redone @ query])
            order = np.argsort(-scores, kind="stable")[:kept]
            out_ids[row, : len(order)] = self.ids[rows[order]]
            out_scores[row, : len(order)] = scores[order]
        return out_scores, out_ids


class Reranker:
    """Re-ranked top-k search of one gallery with one method; keeps what later calls can reuse (neighbour lists,
    k-reciprocal encodings in leave-one-out, DBA vectors)."""

    def __init__(self, source: VectorSource, params: RerankParams) -> None:
        self.source, self.params = source, params
        self._lists = _NeighbourLists(source, params.k1) if params.method == "k-reciprocal" else None
        self._augmented: _Augmented | None = None

    def search(
        self, queries: np.ndarray, depth: int, query_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``depth`` scores and ids of each query [M, d]; with ``query_ids`` (leave-one-out), each query is that
        gallery item and is left out of its results and of everything its ranking draws on."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        method = self.params.method
        if method == "none":
            return _search_without(self.source, queries, depth, query_ids)
        if method == "qe":
            return _query_expansion(self.source, queries, depth, self.params, query_ids)
        if method == "dba":
            if self._augmented is None:
                self._augmented = _Augmented(self.source, self.params)
            return self._augmented.search(queries, depth, query_ids)
        assert self._lists is not None
        return _k_reciprocal(self.source, self._lists, queries, depth, self.params, query_ids)


_GALLERY_RERANKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Re-ranked searches run one at a time: a Reranker fills its caches as it searches (a server's compute threads
#: would otherwise build them twice, or read them half-built).
_RERANKING = threading.Lock()


def rerank_search(gallery, queries: np.ndarray, k: int, method: str, **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query [M, d] in ``gallery`` (a ``retrieval.gallery.Gallery``) re-ranked by ``method``
    ("none", "k-reciprocal", "qe" or "dba"; parameters as ``RerankParams``): scores [M, k'] descending and item
    ids [M, k'] int64, -1 (score NaN) where fewer were found. A gallery's neighbour lists and DBA vectors are
    kept for its later searches while it is loaded."""
    settings = RerankParams(method=method, **params)
    if k < 1:
        raise UserValueError(f"k must be at least 1, got {k}")
    with _RERANKING:
        kept = _GALLERY_RERANKERS.setdefault(gallery, {})
        if settings not in kept:
            kept.clear()
            kept[settings] = Reranker(VectorSource.of_gallery(gallery), settings)
        return kept[settings].search(queries, k)


def rerank_knn(params: RerankParams) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """A search with ``retrieval.metrics.knn_exclude_self``'s signature and contract that re-ranks by ``params``:
    what ``metrics.evaluate`` takes as ``knn``. It keeps its state for the gallery it was last given."""
    state: dict[str, Any] = {}

    def knn(gallery, queries, depth, query_ids=None, chunk_size=None):
        del chunk_size
        if state.get("rows") is not gallery:
            state["rows"], state["reranker"] = gallery, Reranker(VectorSource.of_rows(gallery), params)
        return state["reranker"].search(queries, depth, None if query_ids is None else np.asarray(query_ids))

    return knn
