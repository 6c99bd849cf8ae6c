"""A trained model's easiest-positive / hardest-negative pairs over a gallery (paper Fig. 7), and collapse checks.

For every image of a sample of the training split and of the evaluation split:
S_ap = similarity to the most similar other image of its class, S_an =
similarity to the most similar image of another class. A collapsed embedding
shows as every point near (1, 1) and a mean pairwise similarity near 1.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import catalog
from retrieval.metrics import mean_pairwise_similarity


@dataclass(frozen=True)
class GalleryPanel:
    title: str
    s_ap: np.ndarray
    s_an: np.ndarray
    mean_similarity: float
    chance_recall_at_1: float


def nearest_positive_and_negative(
    embeddings: np.ndarray, labels: np.ndarray, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the largest cosine to another image of its class and to an image of another class.

    Images without another image of their class (or without any other class) get NaN.
    """
    labels = np.asarray(labels)
    count = len(embeddings)
    s_ap, s_an = np.full(count, np.nan), np.full(count, np.nan)
    for start in range(0, count, block):
        rows = slice(start, min(start + block, count))
        sims = embeddings[rows].astype(np.float64) @ embeddings.T.astype(np.float64)
        same = labels[rows, None] == labels[None, :]
        sims[np.arange(sims.shape[0]), np.arange(start, rows.stop)] = -np.inf  # never itself
        positive = np.where(same, sims, -np.inf).max(axis=1)
        negative = np.where(~same, sims, -np.inf).max(axis=1)
        s_ap[rows] = np.where(np.isfinite(positive), positive, np.nan)
        s_an[rows] = np.where(np.isfinite(negative), negative, np.nan)
    return s_ap, s_an


def chance_recall_at_1(labels: np.ndarray) -> float:
    """Leave-one-out Recall@1 of a random ranking: the chance that a random other image shares the label."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        return float("nan")
    _, counts = np.unique(labels, return_counts=True)
    return float((counts * (counts - 1)).sum() / (len(labels) * (len(labels) - 1)))


def sample_by_class(records: list[catalog.ImageRecord], budget: int, seed: int = 0) -> list[catalog.ImageRecord]:
    """About ``budget`` records spread over classes: up to ceil(budget / classes) images each (at least 2),
    classes taken in a seeded random order until the budget is met."""
    by_class: dict[str, list[catalog.ImageRecord]] = defaultdict(list)
    for record in records:
        by_class[record.label].append(record)
    rng = random.Random(seed)
    labels = sorted(by_class)
    rng.shuffle(labels)
    per_class = max(2, math.ceil(budget / max(1, len(labels))))
    chosen: list[catalog.ImageRecord] = []
    for label in labels:
        if len(chosen) >= budget:
            break
        members = list(by_class[label])
        rng.shuffle(members)
        chosen.extend(members[:per_class])
    return chosen


def analyse_checkpoint(
    checkpoint: Path, *, data_root: str | None = None, max_images: int = 2000, device: str = "auto"
) -> list[GalleryPanel]:
    """Embed a sample of the training split and of the evaluation split with the checkpoint's model."""
    import torch

    from training.data import embed_records
    from training.export import load_checkpoint_model
    from training.trainer import evaluation_splits, pick_device, preprocessing_of

    model, config = load_checkpoint_model(checkpoint)
    root = data_root or config.data_root
    records = catalog.read_dataset(config.dataset, root)
    train = catalog.select_split(records, "train")
    unseen, _ = evaluation_splits(records, config.dataset)
    shared = bool({r.label for r in train} & {r.label for r in unseen})
    target = pick_device(device)
    model = model.to(target).to(memory_format=torch.channels_last)
    spec = preprocessing_of(config)
    panels = []
    for title, split in (
        ("training classes (train split)", train),
        ("test split, unseen images of the same classes" if shared else "unseen classes (test split)", unseen),
    ):
        if not split:
            continue
        embeddings, labels, _ = embed_records(model, sample_by_class(split, max_images), spec, target)
        s_ap, s_an = nearest_positive_and_negative(embeddings, labels)
        keep = ~(np.isnan(s_ap) | np.isnan(s_an))
        panels.append(
            GalleryPanel(
                title, s_ap[keep], s_an[keep], mean_pairwise_similarity(embeddings), chance_recall_at_1(labels)
            )
        )
    return panels
