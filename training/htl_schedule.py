"""--loss htl: when the class tree is rebuilt, how, and how it reaches the other processes and the checkpoints.

The tree (training.htl) is built from the current model's embeddings of the training images before the first
epoch, then every ``htl_rebuild_every`` epochs (0: never again); it sets the loss's margins and the sampler's
class groups. A resumed run goes on with the tree saved in the checkpoint, unless its epoch rebuilds anyway.

With several processes each embeds a slice of the images with rank 0's BatchNorm statistics, rank 0 builds the
tree, logs it and sends it to the others, so that all of them draw the same global batches.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import catalog
from training import distributed
from training.config import TrainConfig
from training.htl import ClassTree, build_tree
from training.losses import HTLLoss
from training.run_folder import RunFolder
from training.sampler import HTLBatchSampler
from training.shared_embedding import SharedEmbedder


def rebuild_due(epoch: int, every: int, holding_tree: bool) -> bool:
    """Before the first epoch, every ``every`` epochs (never again for 0), and whenever no tree is held (a
    resume from a checkpoint without one)."""
    return not holding_tree or epoch == 0 or bool(every and epoch % every == 0)


class HTLSchedule:
    """The class tree of one run: ``due`` says which epochs rebuild it, ``rebuild`` builds it and hands it to
    ``loss_fn`` and ``sampler``, ``state``/``load_state`` carry it through a checkpoint."""

    def __init__(
        self,
        config: TrainConfig,
        train_records: list[catalog.ImageRecord],
        class_index: dict[str, int],
        loss_fn: HTLLoss,
        sampler: HTLBatchSampler,
        embed: SharedEmbedder,
        run: RunFolder,
    ) -> None:
        self.config, self.train_records, self.class_index = config, train_records, class_index
        self.loss_fn, self.sampler, self.embed, self.run = loss_fn, sampler, embed, run
        self.tree: ClassTree | None = None

    def due(self, epoch: int) -> bool:
        return rebuild_due(epoch, self.config.htl_rebuild_every, self.tree is not None)

    def rebuild(self, model: torch.nn.Module, epoch: int, iteration: int) -> ClassTree:
        """Embed the training images with ``model``, build the tree (rank 0), log it as an ``htl_tree`` line of
        metrics.jsonl and use it on every process."""
        started = time.perf_counter()
        distributed.broadcast_buffers(model)
        embeddings, names = self.embed(model, self.tree_records(epoch))
        tree = self._build(epoch, iteration, embeddings, names, started) if distributed.rank() == 0 else None
        tree = distributed.broadcast_object(tree)
        self.use(tree)
        return tree

    def _build(
        self, epoch: int, iteration: int, embeddings: np.ndarray, names: np.ndarray, started: float
    ) -> ClassTree:
        labels = np.array([self.class_index[name] for name in names], dtype=np.int64)
        m = self.config.htl_neighbours
        tree = build_tree(
            embeddings,
            labels,
            len(self.class_index),
            levels=self.config.htl_levels,
            neighbours=min(2 * m, len(self.class_index) - 1),
        )
        seconds = time.perf_counter() - started
        line = {
            "type": "htl_tree",
            "epoch": epoch,
            "iter": iteration,
            "d0": tree.d0,
            "classes": tree.num_classes,
            "images": len(labels),
            "seconds": seconds,
            "nodes_per_level": tree.nodes_per_level(),
        }
        self.run.log(line)
        print(
            f"epoch {epoch + 1}: HTL class tree over {tree.num_classes} classes from {len(labels)} images, "
            f"d0 {tree.d0:.3f}, nodes per level {' '.join(map(str, line['nodes_per_level']))} ({seconds:.1f} s)"
        )
        return tree

    def use(self, tree: ClassTree) -> None:
        self.tree = tree
        self.loss_fn.set_tree(tree)
        self.sampler.update_neighbours(tree.neighbours)

    def tree_records(self, epoch: int) -> list[catalog.ImageRecord]:
        """The training records the tree is built from: all, or at most htl_tree_images_per_class per class,
        drawn from (seed, epoch)."""
        limit = self.config.htl_tree_images_per_class
        if limit is None:
            return self.train_records
        rng = np.random.default_rng([self.config.seed, epoch, 1])
        by_class: dict[str, list[int]] = {}
        for i, record in enumerate(self.train_records):
            by_class.setdefault(record.label, []).append(i)
        kept = sorted(
            i
            for members in by_class.values()
            for i in (members if len(members) <= limit else rng.choice(members, limit, replace=False))
        )
        return [self.train_records[i] for i in kept]

    def state(self) -> dict[str, Any] | None:
        """The tree the last epoch trained with, for the checkpoint (None before the first build)."""
        return tree_state(self.tree) if self.tree is not None else None

    def load_state(self, state: dict[str, Any]) -> None:
        self.use(tree_from_state(state))


def tree_state(tree: ClassTree) -> dict[str, Any]:
    """The class tree as tensors and numbers, which ``torch.load(weights_only=True)`` reads back."""
    return {
        "level_ids": torch.from_numpy(tree.level_ids),
        "thresholds": torch.from_numpy(tree.thresholds),
        "within": torch.from_numpy(tree.within),
        "d0": tree.d0,
        "neighbours": torch.from_numpy(tree.neighbours),
    }


def tree_from_state(state: dict[str, Any]) -> ClassTree:
    # .cpu(): --resume on CUDA loads the checkpoint onto the GPU
    return ClassTree(
        level_ids=state["level_ids"].cpu().numpy(),
        thresholds=state["thresholds"].cpu().numpy(),
        within=state["within"].cpu().numpy(),
        d0=float(state["d0"]),
        neighbours=state["neighbours"].cpu().numpy(),
    )
