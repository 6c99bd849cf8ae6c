"""The class tree of the Hierarchical Triplet Loss (Ge et al., ECCV 2018).

Embeddings are unit vectors and distances squared Euclidean, d = ‖f_i − f_j‖² =
2 − 2·cos ∈ [0, 4]. The tree is built from the current model's embeddings of
the training images: leaves are classes (level 0), and at level l = 1..L the
nodes closer than d_l = l·(4 − d0)/L + d0 are merged, so that everything is one
node at level L (d_L = 4). Two classes' merge level H(p, q) sets the margin of
their triplets, and each class's nearest classes feed the anchor-neighbour
sampler (``training.sampler.HTLBatchSampler``).

Node distance: average linkage (UPGMA) over the class-distance matrix, i.e.
the distance between two nodes is the mean class distance over all pairs of
their classes, each class pair weighted equally whatever its image counts.
That is the mean squared distance between the nodes' images with every class
pair given the same weight, so a class with many images does not dominate its
node. Cuts of one average-linkage tree at increasing thresholds are nested
(average linkage has no inversions), so the levels form a tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.cluster.hierarchy import fcluster, linkage

ROW_BLOCK = 2048  # class means multiplied per block when filling the condensed distance matrix


@dataclass(frozen=True)
class ClassTree:
    """Per-level node ids of every class, the level thresholds, within-class distances and nearest classes."""

    level_ids: np.ndarray  # [L+1, C] int: node id of each class at each level; row 0 = the classes, row L = one node
    thresholds: np.ndarray  # [L+1] float: d_l = l·(4 − d0)/L + d0, so d_0 = d0 and d_L = 4
    within: np.ndarray  # [C] float: s_p, mean squared distance between two images of class p
    d0: float  # mean of s_p over the classes with at least two images
    neighbours: np.ndarray  # [C, k] int: the k nearest other classes, nearest first; −1 where there is none

    @property
    def levels(self) -> int:
        return len(self.thresholds) - 1

    @property
    def num_classes(self) -> int:
        return self.level_ids.shape[1]

    def nodes_per_level(self) -> list[int]:
        return [len(np.unique(ids)) for ids in self.level_ids]


def class_means(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean embedding μ_p and image count n_p of every class (zero vector and 0 for a class without images)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    one_hot = sparse.csr_matrix(
        (np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(num_classes, len(labels))
    )
    sums = one_hot @ embeddings
    return sums / np.maximum(counts, 1)[:, None], counts


def within_class_distances(means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """s_p = mean of ‖f_i − f_j‖² over the ordered pairs i ≠ j of class p, = 2n(1 − ‖μ_p‖²)/(n − 1).

    Over all n² ordered pairs (i = j included) the mean is 2 − 2‖μ_p‖² (see
    ``class_distances`` with p = q); the n pairs i = j add zero, so the sum is
    n²(2 − 2‖μ_p‖²) and the mean over the n(n − 1) others is as stated.
    NaN for classes with fewer than two images.
    """
    n = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = 2.0 * n * (1.0 - (means * means).sum(1)) / (n - 1.0)
    return np.where(counts >= 2, np.clip(s, 0.0, 4.0), np.nan)


def class_distances(means: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """d(p, q) = mean of ‖f_i − f_j‖² over images i of p and j of q, = 2 − 2·μ_p·μ_q, for p in ``means``
    and q in ``others`` (default: ``means`` again, giving the [C, C] matrix).

    For unit vectors ‖f_i − f_j‖² = 2 − 2·f_i·f_j, and the mean of f_i·f_j over
    the n_p·n_q pairs factorises: (1/n_p Σ_i f_i)·(1/n_q Σ_j f_j) = μ_p·μ_q. So
    the mean over all image pairs is 2 − 2·μ_p·μ_q: one matrix product instead of
    a loop over images. (The diagonal, p = q, counts the pairs i = j too.)
    """
    return np.clip(2.0 - 2.0 * means @ (means if others is None else others).T, 0.0, 4.0)


def condensed_class_distances(means: np.ndarray) -> np.ndarray:
    """The upper triangle of ``class_distances(means)`` in scipy's condensed order, float64.

    Filled block of rows by block, each block multiplied only with the classes
    from its first row on (half the work of the full product), in float32
    (ample for distances in [0, 4] that only order merges). Memory stays at the
    C(C − 1)/2 condensed entries rather than adding a full C×C matrix
    (10,000 classes: 400 MB, not 1.2 GB).
    """
    means = np.asarray(means, dtype=np.float32)
    count = len(means)
    condensed = np.empty(count * (count - 1) // 2)
    offset = 0
    for start in range(0, count, ROW_BLOCK):
        block = class_distances(means[start : start + ROW_BLOCK], means[start:])
        for row, distances in enumerate(block):
            tail = distances[row + 1 :]
            condensed[offset : offset + len(tail)] = tail
            offset += len(tail)
    return condensed


def level_thresholds(d0: float, levels: int) -> np.ndarray:
    """d_l = l·(4 − d0)/L + d0 for l = 0..L."""
    return np.arange(levels + 1) * (4.0 - d0) / levels + d0


def nearest_classes(means: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` classes with the largest μ_p·μ_q (smallest class distance) of each class, itself
    excluded, nearest first; −1 where fewer exist. FAISS exact inner-product search over the class means
    (not unit vectors: their inner product is exactly what the class distance needs)."""
    import faiss

    vectors = np.ascontiguousarray(means, dtype=np.float32)
    found = np.full((len(vectors), count), -1, dtype=np.int64)
    if count == 0 or len(vectors) < 2:
        return found
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    searched = min(count + 1, len(vectors))
    _, ids = index.search(vectors, searched)
    # a class is not always its own best match (μ_p·μ_q can exceed ‖μ_p‖²): drop it wherever it appears
    others = ids != np.arange(len(vectors))[:, None]
    order = np.argsort(~others, axis=1, kind="stable")[:, : searched - 1]
    kept = np.take_along_axis(ids, order, axis=1)[:, :count]
    found[:, : kept.shape[1]] = kept
    return found


def build_tree(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int, *, levels: int = 16, neighbours: int = 3
) -> ClassTree:
    """The class tree of unit ``embeddings`` [N, D] with class indices ``labels`` [N] in 0..num_classes − 1.

    Classes without images get s = d0, stay their own node below level L, and
    have no neighbours (−1); they are left out of the linkage and of the
    neighbour search. A class with one image has no within-class distance and
    gets s = d0 too. ``neighbours`` nearest classes are stored per class, a
    few more than a sampler group needs so that it can skip classes already in
    its batch.
    """
    if levels < 1:
        raise ValueError(f"a class tree needs at least 1 level, got {levels}")
    means, counts = class_means(embeddings, labels, num_classes)
    within = within_class_distances(means, counts)
    measured = ~np.isnan(within)
    d0 = float(within[measured].mean()) if measured.any() else 0.0
    within = np.where(measured, within, d0)
    thresholds = level_thresholds(d0, levels)

    present = np.flatnonzero(counts > 0)
    level_ids = np.tile(np.arange(num_classes), (levels + 1, 1))
    level_ids[levels] = 0
    if len(present) >= 2:
        merges = linkage(condensed_class_distances(means[present]), method="average")
        for level in range(1, levels):
            # fcluster numbers nodes 1..k; offset past every class index so absent classes keep unique ids
            level_ids[level, present] = num_classes + fcluster(merges, thresholds[level], criterion="distance")
    nearest = np.full((num_classes, neighbours), -1, dtype=np.int64)
    found = nearest_classes(means[present], neighbours)
    nearest[present] = np.where(found >= 0, present[np.maximum(found, 0)], -1)
    return ClassTree(level_ids=level_ids, thresholds=thresholds, within=within, d0=d0, neighbours=nearest)


def merge_level(tree: ClassTree, a_classes: np.ndarray, n_classes: np.ndarray) -> np.ndarray:
    """H(a, n): the first level at which classes a and n share a node (0 when a = n); broadcasts."""
    a_classes, n_classes = np.broadcast_arrays(np.asarray(a_classes), np.asarray(n_classes))
    same = tree.level_ids[:, a_classes] == tree.level_ids[:, n_classes]  # [L+1, ...]
    return same.argmax(axis=0)  # level L is one node, so some level always matches


def margins(tree: ClassTree, anchor_classes: np.ndarray, negative_classes: np.ndarray, beta: float) -> np.ndarray:
    """α = max(β + d_{H(y_a, y_n)} − s_{y_a}, 0) for each (anchor class, negative class); broadcasts."""
    level = merge_level(tree, anchor_classes, negative_classes)
    alpha = beta + tree.thresholds[level] - tree.within[np.asarray(anchor_classes)]
    return np.maximum(alpha, 0.0)
