"""Balanced P×K batches: P classes, K images of each (K = 2 in the paper).

In a distributed run every process generates the same global batch from
(seed, epoch) and keeps its own block of whole classes (``rank``, ``world_size``),
so the processes together see exactly the batch one process would, and each
class's K images stay on one process, where its anchors find their positives.
"""

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

    With ``world_size`` > 1, P is the global batch's number of classes and
    must be a multiple of the world size: process ``rank`` yields classes
    rank·P/W … (rank + 1)·P/W − 1 of each global batch, with all K images of
    each. Every process has the same number of batches per epoch.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes_per_batch: int,
        images_per_class: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_rank(rank, world_size)
        if classes_per_batch % world_size:
            raise ValueError(
                f"the global batch's {classes_per_batch} classes (P) cannot be split into whole classes over "
                f"{world_size} processes: P must be a multiple of {world_size} (set --batch-size to P × images per "
                f"class with such a P)"
            )
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
        self.rank, self.world_size = rank, world_size
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
            chosen: set[int] = set()  # a set: asking whether a class is in the batch takes one step, not P
            deferred: list[int] = []  # already in this batch; first in line for the next one
            while len(chosen) < self.p:
                cls = self._next_class(class_order, chosen, deferred, rng)
                chosen.add(cls)
                batch.extend(self._deal(cls, pools, rng))
            class_order.extend(reversed(deferred))
            yield self._shard(batch)

    def _next_class(
        self, class_order: list[int], chosen: set[int], deferred: list[int], rng: np.random.Generator
    ) -> int:
        """The next class of the shuffled order (refilled when empty) that is not in the batch yet."""
        while True:
            if not class_order:
                class_order.extend(int(c) for c in rng.permutation(self.classes))
            candidate = class_order.pop()
            if candidate not in chosen:
                return candidate
            deferred.append(candidate)

    def _shard(self, batch: list[int]) -> list[int]:
        """This process's block of a global batch: P / world_size whole classes (each class's K images are
        consecutive in the batch and every class has exactly K)."""
        share = len(batch) // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

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


class HTLBatchSampler(PKBatchSampler):
    """Anchor-neighbour batches of the Hierarchical Triplet Loss (Ge et al., 2018): l′ groups of m classes,
    t images each, so a batch holds l′·m·t images.

    A group is a class drawn like PKBatchSampler draws its classes, followed by
    its m − 1 nearest classes (``update_neighbours``, from the class tree) that
    are not yet in the batch, taken in order of nearness. Without neighbours
    (before the first tree) or when a class's list runs out, the group is
    completed with the next classes of the shuffled order, so the sampler then
    behaves like a P×K sampler with P = l′·m. Images are dealt as by
    PKBatchSampler. Batches depend only on (seed, epoch, neighbours).

    With ``world_size`` > 1 the sampler shards whole groups: l′ must be a
    multiple of the world size, and each process keeps l′ / world_size groups
    (a class with its nearest classes stays together, so a process mines the
    near negatives the group was drawn for even without gathering).
    """

    def __init__(
        self,
        labels: Sequence[int],
        groups_per_batch: int,
        classes_per_group: int,
        images_per_class: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if groups_per_batch < 1 or classes_per_group < 1:
            raise ValueError("groups per batch and classes per group must be at least 1")
        _check_rank(rank, world_size)
        if groups_per_batch % world_size:
            raise ValueError(
                f"the global batch's {groups_per_batch} groups of {classes_per_group} classes cannot be split into "
                f"whole groups over {world_size} processes: the number of groups must be a multiple of {world_size} "
                "(set --batch-size to groups × htl_neighbours × images per class with such a number of groups)"
            )
        super().__init__(
            labels, groups_per_batch * classes_per_group, images_per_class, seed=seed, rank=rank, world_size=world_size
        )
        self.groups, self.m = groups_per_batch, classes_per_group
        self.neighbours: np.ndarray | None = None

    def update_neighbours(self, neighbours: np.ndarray) -> None:
        """Row c: classes nearest to class c, nearest first (at least m − 1 of them; −1 marks none)."""
        self.neighbours = np.asarray(neighbours)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools: dict[int, list[int]] = {c: [] for c in self.classes}
        class_order: list[int] = []
        for _ in range(self.batches_per_epoch):
            chosen: list[int] = []  # in batch order; ``taken`` holds the same classes, to look them up in one step
            taken: set[int] = set()
            deferred: list[int] = []  # already in this batch; first in line for the next one

            def take(cls: int) -> None:
                chosen.append(cls)
                taken.add(cls)

            for _ in range(self.groups):
                take(self._next_class(class_order, taken, deferred, rng))
                group_end = len(chosen) + self.m - 1
                for neighbour in self._neighbours_of(chosen[-1]):
                    if len(chosen) == group_end:
                        break
                    if neighbour not in taken:
                        take(neighbour)
                while len(chosen) < group_end:
                    take(self._next_class(class_order, taken, deferred, rng))
            class_order.extend(reversed(deferred))
            yield self._shard([i for cls in chosen for i in self._deal(cls, pools, rng)])

    def _neighbours_of(self, cls: int) -> list[int]:
        if self.neighbours is None or cls >= len(self.neighbours):
            return []
        return [int(c) for c in self.neighbours[cls] if c >= 0 and int(c) in self.members]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} processes' ranks 0 … {world_size - 1}")
