"""Evaluate a gallery (leave-one-out, or with separate query images) and record the result in eval.json,
and each query's own results in eval_queries.npz (``retrieval.query_results``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, overload

import numpy as np

from catalog.registry import CHAIN_LABELS
from core.atomic import atomic_write_text
from core.errors import UserValueError
from retrieval.columns import format_columns
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import Gallery, GalleryMismatchError
from retrieval.image_folder import list_image_folder
from retrieval.metrics import PerQuery, evaluate, evaluate_per_query
from retrieval.query_results import ClassResult, QueryResults
from retrieval.rerank import RerankParams, rerank_knn

#: Hotels-50K reports chain Recall@1/3/5 besides instance recall (catalog.registry's label set); any gallery
#: whose items carry chains gets them.
CHAIN_KS = CHAIN_LABELS.ks

#: (path, label) or (path, label, chain) per query image
Query = tuple[str, str] | tuple[str, str, str | None]


def _without_chainless(query_chains: Sequence[str]) -> list[str]:
    """Give each query of a hotel outside any chain (a negative chain id, as Hotels-50K's own
    evaluation treats them) a label no gallery item has, so it is left out of chain recall and
    counted under "chain_skipped"."""
    return [
        chain if not chain.lstrip().startswith("-") else f"<no chain: query {i}>"
        for i, chain in enumerate(query_chains)
    ]


@overload
def evaluate_gallery(
    gallery: Gallery,
    ks: Sequence[int] = ...,
    queries: Sequence[Query] | str | os.PathLike[str] | None = ...,
    embedder: OnnxEmbedder | None = ...,
    *,
    batch_size: int = ...,
    progress: bool = ...,
    per_query_top: None = ...,
    rerank: RerankParams | None = ...,
) -> dict[str, Any]: ...


@overload
def evaluate_gallery(
    gallery: Gallery,
    ks: Sequence[int] = ...,
    queries: Sequence[Query] | str | os.PathLike[str] | None = ...,
    embedder: OnnxEmbedder | None = ...,
    *,
    batch_size: int = ...,
    progress: bool = ...,
    per_query_top: int,
    rerank: RerankParams | None = ...,
) -> tuple[dict[str, Any], QueryResults]: ...


def evaluate_gallery(
    gallery: Gallery,
    ks: Sequence[int] = (1, 2, 4, 8),
    queries: Sequence[Query] | str | os.PathLike[str] | None = None,
    embedder: OnnxEmbedder | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    per_query_top: int | None = None,
    rerank: RerankParams | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], QueryResults]:
    """Recall@K, MAP@R and P@1 of a gallery, as one flat dict ready for eval.json.

    ``queries`` None means leave-one-out over the gallery; a folder is read
    like ``sct index --images`` does. Query images are embedded with the
    gallery's own model unless ``embedder`` is given, which must be the same
    model. When gallery (and queries) carry Hotels-50K chains, chain
    Recall@1/3/5 is added. Unreadable query images are skipped and listed
    under "unreadable_queries". With ``per_query_top`` K, each evaluated
    query's own results, with its top K gallery ids, come back too:
    ``(results, QueryResults)``. ``rerank`` re-ranks each query's results
    (``retrieval.rerank``; in leave-one-out the query is left out of all it
    draws on); the results record it under "rerank".
    """
    rerank = rerank or RerankParams()
    embedder = embedder or gallery.embedder
    if embedder is not gallery.embedder and embedder.sha256 != gallery.manifest["model_sha256"]:
        raise GalleryMismatchError(
            f"model sha256 mismatch: embedder {embedder.model_path} = {embedder.sha256}, "
            f"gallery {gallery.name} manifest = {gallery.manifest['model_sha256']}"
        )
    unreadable: list[dict[str, str]] = []
    if queries is None:
        mode = "leave-one-out"
        query_paths = None
        chains = {"chain": (gallery.chains, None, CHAIN_KS)} if gallery.chains is not None else None
        metrics, per_query = _evaluate(gallery, ks, per_query_top, rerank, extra_labels=chains)
    else:
        mode = "queries"
        queries = list_image_folder(queries) if isinstance(queries, (str, os.PathLike)) else list(queries)
        result = embedder.embed_paths([query[0] for query in queries], batch_size=batch_size, progress=progress)
        unreadable = [{"path": path, "reason": reason} for path, reason in result.failures]
        if not len(result.kept_indices):
            raise UserValueError(f"none of the {len(queries)} query images could be read")
        kept = [queries[i] for i in result.kept_indices]
        query_paths = [query[0] for query in kept]
        query_chains = [query[2] if len(query) > 2 else None for query in kept]
        chains = None
        if gallery.chains is not None and None not in query_chains:
            chains = {"chain": (gallery.chains, _without_chainless(query_chains), CHAIN_KS)}
        metrics, per_query = _evaluate(
            gallery,
            ks,
            per_query_top,
            rerank,
            query_emb=result.embeddings,
            query_labels=[query[1] for query in kept],
            extra_labels=chains,
        )
    results = {
        "gallery": gallery.name,
        "model_sha256": gallery.manifest["model_sha256"],
        "faiss_factory": gallery.manifest["faiss_factory"],
        "mode": mode,
        "ks": sorted(set(ks)),
        "rerank": rerank.record(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **metrics,
        "unreadable_queries": unreadable,
    }
    if per_query is None:
        return results
    return results, _query_results(per_query, query_paths, mode, gallery.manifest["model_sha256"], gallery.items.ids)


def _evaluate(
    gallery: Gallery, ks: Sequence[int], top: int | None, rerank: RerankParams, **kwargs: Any
) -> tuple[dict[str, float | int], PerQuery | None]:
    """``metrics.evaluate`` of the gallery's vectors, or with ``top`` ``metrics.evaluate_per_query``, searched
    through ``rerank`` unless it is "none"."""
    if rerank.method != "none":
        kwargs["knn"] = rerank_knn(rerank)
    if top is None:
        return evaluate(gallery.vectors(), gallery.labels, ks, **kwargs), None
    return evaluate_per_query(gallery.vectors(), gallery.labels, ks, top=top, **kwargs)


def _query_results(
    per_query: PerQuery, query_paths: Sequence[str] | None, mode: str, model_sha256: str, item_ids: np.ndarray
) -> QueryResults:
    """The file's form of ``per_query``: gallery item ids (``item_ids``, by row) of leave-one-out queries and of
    the results, else the query images' paths."""
    if query_paths is None:
        query_item, paths = item_ids[per_query.rows], np.zeros(0, dtype="S1")
    else:
        query_item = np.full(len(per_query.rows), -1)
        paths = np.array([query_paths[row].encode("utf-8") for row in per_query.rows], dtype=np.bytes_)
    histogram = per_query.histogram
    return QueryResults(
        query_item=query_item,
        query_path=paths,
        label=per_query.label,
        label_names=per_query.label_names.astype(str),
        first_correct_rank=per_query.first_correct_rank,
        relevant=per_query.relevant,
        ap_at_r=per_query.ap_at_r,
        r_precision=per_query.r_precision,
        top_ids=np.where(per_query.top_ids >= 0, item_ids[np.maximum(per_query.top_ids, 0)], -1),
        top_scores=per_query.top_scores,
        depth=per_query.depth,
        mode=mode,
        model_sha256=model_sha256,
        hist_edges=histogram.edges,
        hist_positive=histogram.positive,
        hist_negative=histogram.negative,
        hist_queries=histogram.queries,
    )


def save_eval(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as JSON to ``path`` atomically (for a gallery: ``gallery.directory / EVAL_FILE``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def format_table(results: dict[str, Any]) -> str:
    """The metrics as a terminal table: rates in percent, then query counts."""
    rates = [(key, f"{100 * value:.2f}%") for key, value in results.items() if "@" in key]
    counts = [
        (key, f"{value:,}")
        for key, value in results.items()
        if key.endswith(("queries", "skipped")) and isinstance(value, int)
    ]
    if results.get("unreadable_queries"):
        counts.append(("unreadable queries", f"{len(results['unreadable_queries']):,}"))
    title = f"{results['gallery']} ({results['mode']}, {results['faiss_factory']})"
    return title + "\n" + format_columns(("metric", "value"), [*rates, *counts], (False, True))


def format_class_table(classes: Sequence[ClassResult]) -> str:
    """Recall@1 and MAP@R of each class (``query_results.per_class``, worst first) as a terminal table."""
    rows = [(c.label, f"{c.queries:,}", f"{100 * c.recall_at_1:.2f}%", f"{100 * c.map_at_r:.2f}%") for c in classes]
    return format_columns(("class", "queries", "recall@1", "map@r"), rows, (False, True, True, True))
