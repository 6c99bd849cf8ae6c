"""Evaluate a gallery (leave-one-out, or with separate query images) and record the result in eval.json."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from catalog.registry import CHAIN_LABELS
from core.atomic import atomic_write_text
from core.errors import UserValueError
from retrieval.columns import format_columns
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import Gallery, GalleryMismatchError
from retrieval.image_folder import list_image_folder
from retrieval.metrics import evaluate

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


def evaluate_gallery(
    gallery: Gallery,
    ks: Sequence[int] = (1, 2, 4, 8),
    queries: Sequence[Query] | str | os.PathLike[str] | None = None,
    embedder: OnnxEmbedder | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall@K, MAP@R and P@1 of a gallery, as one flat dict ready for eval.json.

    ``queries`` None means leave-one-out over the gallery; a folder is read
    like ``sct index --images`` does. Query images are embedded with the
    gallery's own model unless ``embedder`` is given, which must be the same
    model. When gallery (and queries) carry Hotels-50K chains, chain
    Recall@1/3/5 is added. Unreadable query images are skipped and listed
    under "unreadable_queries".
    """
    embedder = embedder or gallery.embedder
    if embedder is not gallery.embedder and embedder.sha256 != gallery.manifest["model_sha256"]:
        raise GalleryMismatchError(
            f"model sha256 mismatch: embedder {embedder.model_path} = {embedder.sha256}, "
            f"gallery {gallery.name} manifest = {gallery.manifest['model_sha256']}"
        )
    unreadable: list[dict[str, str]] = []
    if queries is None:
        mode = "leave-one-out"
        chains = {"chain": (gallery.chains, None, CHAIN_KS)} if gallery.chains is not None else None
        metrics = evaluate(gallery.vectors(), gallery.labels, ks, extra_labels=chains)
    else:
        mode = "queries"
        queries = list_image_folder(queries) if isinstance(queries, (str, os.PathLike)) else list(queries)
        result = embedder.embed_paths([query[0] for query in queries], batch_size=batch_size, progress=progress)
        unreadable = [{"path": path, "reason": reason} for path, reason in result.failures]
        if not len(result.kept_indices):
            raise UserValueError(f"none of the {len(queries)} query images could be read")
        kept = [queries[i] for i in result.kept_indices]
        query_chains = [query[2] if len(query) > 2 else None for query in kept]
        chains = None
        if gallery.chains is not None and None not in query_chains:
            chains = {"chain": (gallery.chains, _without_chainless(query_chains), CHAIN_KS)}
        metrics = evaluate(
            gallery.vectors(),
            gallery.labels,
            ks,
            query_emb=result.embeddings,
            query_labels=[query[1] for query in kept],
            extra_labels=chains,
        )
    return {
        "gallery": gallery.name,
        "model_sha256": gallery.manifest["model_sha256"],
        "faiss_factory": gallery.manifest["faiss_factory"],
        "mode": mode,
        "ks": sorted(set(ks)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **metrics,
        "unreadable_queries": unreadable,
    }


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
