"""Evaluation during training: Recall@K and MAP@R on unseen images, logged, printed, and checked for collapse.

The metrics are those of ``sct eval`` (``retrieval.metrics.evaluate``): leave-one-out over the queries, or
queries against a gallery (In-shop, Hotels-50K). With several processes each embeds a slice of the images with
rank 0's weights and BatchNorm statistics (``SharedEmbedder``), and rank 0 alone scores them, so the Recall@K
logged is that of rank 0's model, the one its checkpoint holds.

A collapsed embedding (every image at nearly the same point) scores near chance and its Recall@K alone does
not say why; the mean pairwise similarity does, so it is logged with every evaluation and a warning says what
to try when it is above ``COLLAPSE_SIMILARITY``. A stall with low similarities is the stall detector's
(training.stall), which watches every iteration instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import catalog
from retrieval.metrics import evaluate, mean_pairwise_similarity
from training import distributed
from training.knn import knn_for
from training.run_folder import RunFolder
from training.shared_embedding import SharedEmbedder

COLLAPSE_SIMILARITY = 0.95  # mean pairwise cosine above which an evaluation warns of a collapsed embedding


class Evaluator:
    """Scores a model on ``queries`` (against ``gallery``, or leave-one-out when it is None) of split ``split``,
    at ``ks``; writes an ``eval`` line to ``run``."""

    def __init__(
        self,
        queries: list[catalog.ImageRecord],
        gallery: list[catalog.ImageRecord] | None,
        split: str,
        ks: Sequence[int],
        embed: SharedEmbedder,
        run: RunFolder,
    ) -> None:
        self.queries, self.gallery, self.split, self.ks = queries, gallery, split, tuple(ks)
        self.embed, self.run = embed, run

    def evaluate(self, model: torch.nn.Module, epoch: int, iteration: int) -> float | None:
        """Recall@K of ``model``'s embeddings: on rank 0 the first K's recall, after logging and printing the
        results; on the other processes None, after embedding their share."""
        distributed.broadcast_buffers(model)
        query_emb, query_labels = self.embed(model, self.queries, keep=True)  # crops kept for the next evaluation
        gallery_emb, gallery_labels = (
            self.embed(model, self.gallery, keep=True) if self.gallery is not None else (None, None)
        )
        if distributed.rank() != 0:
            return None
        results = scores(
            query_emb, query_labels, gallery_emb, gallery_labels, self.ks, knn=knn_for(self.embed.device)
        )  # exact search on the GPU when training there
        self.run.log({"type": "eval", "epoch": epoch, "iter": iteration, "split": self.split, **results})
        shown = "  ".join(f"R@{k} {results[f'recall@{k}']:.4f}" for k in self.ks)
        print(f"epoch {epoch + 1}: {shown}  MAP@R {results['map@r']:.4f}  ({results['queries']} queries)")
        if results["mean_similarity"] > COLLAPSE_SIMILARITY:
            print(collapse_warning(results["mean_similarity"], self.split))
        return float(results[f"recall@{self.ks[0]}"])


def scores(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None,
    gallery_labels: np.ndarray | None,
    ks: Sequence[int],
    **kwargs: Any,
) -> dict[str, Any]:
    """``retrieval.metrics.evaluate``'s results (leave-one-out over the queries when ``gallery_emb`` is None) and
    the queries' mean pairwise similarity; ``kwargs`` go to ``evaluate`` (``knn``)."""
    if gallery_emb is None:
        results = evaluate(query_emb, query_labels, ks=tuple(ks), **kwargs)
    else:
        results = evaluate(
            gallery_emb, gallery_labels, ks=tuple(ks), query_emb=query_emb, query_labels=query_labels, **kwargs
        )
    results["mean_similarity"] = mean_pairwise_similarity(query_emb)
    return results


def collapse_warning(mean_similarity: float, split: str) -> str:
    return (
        f"warning: the embedding looks collapsed: mean pairwise similarity "
        f"{mean_similarity:.3f} over the {split} images. Every triplet is then "
        "hard; with SGD, SCT's push on hard triplets (λ·S_an) is about 1/τ times weaker than NCA's and "
        "may never escape. Try a larger --lr (SCT's tuned lr is several times SHN's), or for SCT a larger --lam; "
        "see docs/hard-negatives/README.md."
    )
