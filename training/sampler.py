"""Balanced P×K batches: P classes, K images of each (K = 2 in the paper)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class PKBatchSampler:
    """Yields batches of dataset indices, P classes × K images each.

    One epoch has ``len(labels) // (P·K)`` batches, so it shows about as many
    images as the dataset holds. Classes are visited in a shuffled order that
    is refilled when it runs out; each class deals its images from a shuffled
    pool that is refilled when empty, so every image is seen before any repeats.
    A class with fewer than K images is completed by resampling its images.
    Batches depend only on (seed, epoch): call ``set_epoch`` before iterating.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, images_per_class: int, seed: int = 0) -> None:
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        if classes_per_batch > len(self.classes):
            raise ValueError(
                f"a batch of {classes_per_batch} classes needs at least that many classes; the data has {len(self.classes)}"
            )
        if images_per_class < 1 or classes_per_batch < 1:
            raise ValueError("classes per batch and images per class must be at least 1")
        self.members = {c: np.flatnonzero(labels == c) for c in self.classes}
        self.p, self.k, self.seed = classes_per_batch, images_per_class, seed
        self.batches_per_epoch = max(1, len(labels) // (classes_per_batch * images_per_class))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools: dict[int, list[int]] = {c: [] for c in self.classes}
        class_order: list[int] = []
        for _ in range(self.batches_per_epoch):
            batch: list[int] = []
            chosen: set[int] = set()
            deferred: list[int] = []  # already in this batch; first in line for the next one
            while len(chosen) < self.p:
                if not class_order:
                    class_order = list(rng.permutation(self.classes))
                candidate = class_order.pop()
                if candidate in chosen:
                    deferred.append(candidate)
                    continue
                chosen.add(candidate)
                batch.extend(self._deal(candidate, pools, rng))
            class_order.extend(reversed(deferred))
            yield batch

    def _deal(self, cls: int, pools: dict[int, list[int]], rng: np.random.Generator) -> list[int]:
        members = self.members[cls]
        if len(members) < self.k:
            return [int(i) for i in rng.choice(members, size=self.k, replace=True)]
        dealt: list[int] = []
        while len(dealt) < self.k:
            if not pools[cls]:
                pools[cls] = [int(i) for i in rng.permutation(members) if int(i) not in dealt]
            dealt.append(pools[cls].pop())
        return dealt
