"""The training loop: P×K batches, a mined triplet loss, SGD, Recall@K on the test split, atomic checkpoints.

With --loss htl, a class tree is built from the current model before the first epoch and then every
htl_rebuild_every epochs (training.htl); it sets the loss's margins and the sampler's class groups.

Launched by torchrun, each process trains on its share of every global batch (whole classes, training.sampler)
under DistributedDataParallel (training.distributed). Every process embeds its slice of the evaluation images;
rank 0 alone scores them, writes the run folder, builds the HTL class tree (and hands it to the others) and
shows progress; the others wait for it at a barrier.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import catalog
from retrieval.atomic import atomic_write_bytes, atomic_write_text
from retrieval.metrics import evaluate
from retrieval.preprocessing import Preprocessing
from retrieval.shards import ShardSpec
from training import distributed
from training.analysis.model_diagram import mean_pairwise_similarity
from training.config import TrainConfig
from training.data import (RecordImages, SeededBatches, class_index_of, collate_skipping_failures,
                           drop_small_classes, embed_records)
from training.htl import ClassTree, build_tree
from training.knn import knn_for
from training.losses import SCTLoss, TripletStats, build_loss, warm_start_weight
from training.model import build_model
from training.precision import autocast, autocast_dtype
from training.sampler import HTLBatchSampler, PKBatchSampler
from training.stall import StallDetector, stall_window
from training.transforms import Normalizer, eval_pixels, train_pixels


def pick_device(requested: str, index: int | None = None) -> torch.device:
    """The CPU or CUDA device ("auto": CUDA when present), ``index`` picking the GPU (a process's local rank).
    A request that cannot be met is a ValueError, which the command line reports in one line."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if index is None:
        return torch.device("cuda")
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK is {index}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def preprocessing_of(config: TrainConfig) -> Preprocessing:
    return Preprocessing(image_size=config.image_size, resize_size=config.image_size,
                         mean=tuple(config.mean), std=tuple(config.std))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def lr_factor(iteration: int, config: TrainConfig, iters_per_epoch: int) -> float:
    """Learning-rate multiplier at ``iteration``: linear warm-up, then step (per epoch) or cosine decay."""
    warmup = min(1.0, (iteration + 1) / config.warmup_iters) if config.warmup_iters else 1.0
    total = config.epochs * iters_per_epoch
    if config.schedule == "cosine":
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
    epoch = iteration // iters_per_epoch
    passed = sum(epoch >= round(m * config.epochs) for m in config.milestones)
    return warmup * config.gamma ** passed


def build_sampler(labels: list[int], num_classes: int, config: TrainConfig, *, rank: int = 0,
                  world_size: int = 1) -> PKBatchSampler:
    """P×K batches, or for --loss htl anchor-neighbour batches of l′ = batch_size // (m·t) groups of m classes;
    fewer classes per batch when the training split has fewer. ``batch_size`` is the global batch: with several
    processes, process ``rank`` gets its share of whole classes (whole groups for HTL)."""
    t = config.images_per_class
    if config.loss == "htl":
        m = min(config.htl_neighbours, num_classes)
        groups = max(1, min(config.batch_size // (config.htl_neighbours * t), num_classes // m))
        return HTLBatchSampler(labels, groups, m, t, seed=config.seed, rank=rank, world_size=world_size)
    return PKBatchSampler(labels, min(config.batch_size // t, num_classes), t, seed=config.seed, rank=rank,
                          world_size=world_size)


COLLAPSE_SIMILARITY = 0.95  # mean pairwise cosine above which an evaluation warns of a collapsed embedding


class Trainer:
    """One run: ``Trainer(config).fit()`` writes everything into ``config.out``."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.gather = config.gather_embeddings and self.world > 1
        self.run_dir = Path(config.out)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "triplets").mkdir(exist_ok=True)
        self.device = pick_device(config.device, distributed.local_rank() if self.world > 1 else None)
        _seed_everything(config.seed)
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

        records = catalog.read_dataset(config.dataset, config.data_root)
        if config.val_fraction:
            records = catalog.carve_validation(records, config.val_fraction, by=config.val_by)
        self._say(catalog.summarize(records))
        self.train_records, dropped = drop_small_classes(catalog.select_split(records, "train"))
        if dropped:
            self._say(f"dropped {len(dropped)} class(es) with fewer than 2 training images: {', '.join(dropped[:10])}")
        if not self.train_records:
            raise ValueError(f"dataset {config.dataset} at {config.data_root} has no usable training images")
        self.queries, self.gallery = evaluation_splits(records, config.dataset)
        self.evaluated_split = "test"
        if config.val_fraction:
            self.queries, self.gallery = catalog.select_split(records, catalog.VALIDATION_SPLIT), None
            self.evaluated_split = catalog.VALIDATION_SPLIT
            self._say(f"evaluating on {len(self.queries)} held-out training images "
                      f"({len({r.label for r in self.queries})} classes), not on the test split")
        self.spec = preprocessing_of(config)
        self.class_index = class_index_of(self.train_records)
        labels = [self.class_index[r.label] for r in self.train_records]
        self.sampler = build_sampler(labels, len(self.class_index), config, rank=self.rank, world_size=self.world)
        transform = train_pixels(self.spec) if config.augment else eval_pixels(self.spec)
        self.normalize = Normalizer(self.spec)  # the loader's uint8 batches → model input, on the device
        cache = config.cache_images and not config.augment and config.workers == 0
        if config.cache_images and not cache:
            self._say("note: cache_images is ignored: it needs augment: false and workers: 0")
        self.dataset = RecordImages(self.train_records, self.class_index, transform, cache=cache)
        self.iters_per_epoch = min(len(self.sampler), config.max_iters_per_epoch or len(self.sampler))
        self.total_iterations = config.epochs * self.iters_per_epoch
        self.stall = StallDetector(stall_window(self.total_iterations))  # fed by rank 0
        self.loader: DataLoader | None = None  # made at the first epoch; its worker processes serve every epoch

        model = build_model(config.arch, config.dim, config.pretrained, embedding_bn=config.embedding_bn)
        if config.sync_batchnorm and self.world > 1:
            model = distributed.convert_sync_batchnorm(model, self.device)
        # self.model is the bare model: evaluation, the HTL tree, checkpoints and the triplet re-measurement use
        # it; training steps go through self.train_model: DistributedDataParallel around it when several train,
        # torch.compile around that with --compile. They share the parameters.
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.amp_dtype = autocast_dtype(self.device, config.precision)
        self.loss_fn = build_loss(config.loss, lam=config.lam, temperature=config.temperature,
                                  hard_threshold=config.hard_threshold, margin=config.margin,
                                  htl_beta=config.htl_beta, hard_floor=config.hard_floor,
                                  sct_warm_loss=config.sct_warm_loss)
        self.tree: ClassTree | None = None  # --loss htl: the class tree the loss and the sampler use
        self.optimizer = build_optimizer(self.model, config)
        # The schedule must not hold self: a Trainer in a reference cycle outlives train(), and its DDP wrapper keeps
        # the gloo process group's threads alive past destroy_process_group(), to be killed at interpreter exit,
        # which can abort the process after the run is written.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, config=config, iters_per_epoch=self.iters_per_epoch))
        self.start_epoch, self.iteration, self.best_recall = 0, 0, -1.0
        self.skipped_images = 0
        if resume:
            self._resume()
        elif self.is_main:
            (self.run_dir / "metrics.jsonl").write_text("")
        self.train_model = distributed.wrap(self.model, self.device)
        if config.compile:  # around DDP, so that TorchDynamo's DDPOptimizer keeps gradient buckets overlapping
            self.train_model = torch.compile(self.train_model)

    # ---------------------------------------------------------------- running
    def fit(self) -> Path:
        config = self.config
        try:
            for epoch in range(self.start_epoch, config.epochs):
                if self._tree_due(epoch):
                    self.rebuild_tree(epoch)
                self._train_epoch(epoch)
                is_last = epoch == config.epochs - 1
                recall = None
                if self.queries and (is_last or (config.eval_every and (epoch + 1) % config.eval_every == 0)):
                    recall = self.evaluate(epoch)  # every process embeds its share; rank 0 scores
                if self.is_main:
                    self._save_checkpoint(epoch, recall)
                distributed.barrier()
        finally:
            self.loader = None  # stops its persistent worker processes
        skipped = int(distributed.all_reduce_sum(torch.tensor(self.skipped_images, device=self.device)))
        if skipped:
            self._say(f"skipped {skipped} unreadable training image(s) in all")
        return self.run_dir

    def _tree_due(self, epoch: int) -> bool:
        """--loss htl: before the first epoch, every htl_rebuild_every epochs, and whenever no tree is held."""
        if self.config.loss != "htl":
            return False
        every = self.config.htl_rebuild_every
        return self.tree is None or epoch == 0 or bool(every and epoch % every == 0)

    def rebuild_tree(self, epoch: int) -> ClassTree:
        """Embed the training images with the current model, build the class tree, hand it to the loss and
        the sampler, and log it as an ``htl_tree`` line of metrics.jsonl. With several processes each embeds a
        slice of the images with rank 0's BatchNorm statistics, and rank 0 builds the tree and sends it to the
        others, so that all of them draw the same global batches."""
        started = time.perf_counter()
        distributed.broadcast_buffers(self.model)
        embeddings, names = self._embed_shared(self._tree_records(epoch))
        tree = self._build_tree(epoch, embeddings, names, started) if self.is_main else None
        tree = distributed.broadcast_object(tree)
        self._use_tree(tree)
        return tree

    def _build_tree(self, epoch: int, embeddings: np.ndarray, names: np.ndarray, started: float) -> ClassTree:
        labels = np.array([self.class_index[name] for name in names], dtype=np.int64)
        m = self.config.htl_neighbours
        tree = build_tree(embeddings, labels, len(self.class_index), levels=self.config.htl_levels,
                          neighbours=min(2 * m, len(self.class_index) - 1))
        seconds = time.perf_counter() - started
        line = {"type": "htl_tree", "epoch": epoch, "iter": self.iteration, "d0": tree.d0,
                "classes": tree.num_classes, "images": len(labels), "seconds": seconds, "nodes_per_level": tree.nodes_per_level()}
        self._log(line)
        print(f"epoch {epoch + 1}: HTL class tree over {tree.num_classes} classes from {len(labels)} images, "
              f"d0 {tree.d0:.3f}, nodes per level {' '.join(map(str, line['nodes_per_level']))} ({seconds:.1f} s)")
        return tree

    def _use_tree(self, tree: ClassTree) -> None:
        self.tree = tree
        self.loss_fn.set_tree(tree)
        self.sampler.update_neighbours(tree.neighbours)

    def _tree_records(self, epoch: int) -> list[catalog.ImageRecord]:
        """The training records the tree is built from: all, or at most htl_tree_images_per_class per class,
        drawn from (seed, epoch)."""
        limit = self.config.htl_tree_images_per_class
        if limit is None:
            return self.train_records
        rng = np.random.default_rng([self.config.seed, epoch, 1])
        by_class: dict[str, list[int]] = {}
        for i, record in enumerate(self.train_records):
            by_class.setdefault(record.label, []).append(i)
        kept = sorted(i for members in by_class.values()
                      for i in (members if len(members) <= limit else rng.choice(members, limit, replace=False)))
        return [self.train_records[i] for i in kept]

    def _train_epoch(self, epoch: int) -> None:
        config = self.config
        torch.manual_seed(config.seed * 100_003 + epoch + 1_000_003 * self.rank)  # each process its own stream
        if self.loader is None:
            self.loader = training_loader(self.dataset, self.sampler, config, self.device, stream=self.rank)
        self.loader.batch_sampler.set_epoch(epoch)
        loader = self.loader
        self.model.train()
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="it",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True, mininterval=0.5)
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= self.iters_per_epoch:
                break
            self._report_failures(batch.failures)
            # every process must take the step or none: skip it when any process holds fewer than 2 images
            sizes = distributed.gather_sizes(len(batch.labels), self.device)
            if min(sizes) < 2:
                continue
            record = self._train_step(batch, epoch)
            now = time.perf_counter()
            record["images_per_s"] = sum(sizes) / max(now - started, 1e-9)  # the global batch
            started = now
            self._log(record)
            self._watch_for_stall(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", hard=f"{record['hard_fraction']:.2f}",
                            img_s=f"{record['images_per_s']:.0f}")
            bar.update()
        bar.close()

    def _train_step(self, batch: Any, epoch: int) -> dict[str, Any]:
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        images = self.normalize(images.contiguous(memory_format=torch.channels_last))
        if isinstance(self.loss_fn, SCTLoss):
            self.loss_fn.sct_weight = warm_start_weight(self.iteration / self.total_iterations,
                                                        self.config.sct_warmup)
        with autocast(self.device, self.amp_dtype):
            embeddings = self.train_model(images)
        if self.gather:
            loss = distributed.global_batch_loss(self.loss_fn, embeddings.float(), labels)
        else:
            loss = self.loss_fn(embeddings.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        stats = self.loss_fn.stats
        if self.config.triplets_every and self.iteration % self.config.triplets_every == 0:
            self._save_triplets(images, stats, epoch)
        record = {"iter": self.iteration, "epoch": epoch, **self._step_summary(loss, stats), "lr": lr}
        self.iteration += 1
        return record

    def _step_summary(self, loss: torch.Tensor, stats: TripletStats) -> dict[str, float]:
        """Loss and triplet statistics of the global batch: this process's own with one process; with several,
        the mean of the processes' losses (the global loss with --gather-embeddings, whose shares are scaled by
        the world size) and the statistics over every process's anchors."""
        if self.world == 1:
            return {"loss": float(loss.detach()), "hard_fraction": stats.hard_fraction,
                    "mean_s_ap": stats.mean_s_ap, "mean_s_an": stats.mean_s_an}
        s_ap, s_an = stats.pairs.double().unbind(dim=1)
        sums = torch.stack([loss.detach().double().cpu(), (s_an > s_ap).sum().double(), s_ap.sum(), s_an.sum(),
                            torch.tensor(float(stats.valid_anchors), dtype=torch.float64)])
        loss_sum, hard, s_ap_sum, s_an_sum, valid = distributed.all_reduce_sum(sums.to(self.device)).tolist()
        valid = max(valid, 1.0)
        return {"loss": loss_sum / self.world, "hard_fraction": hard / valid, "mean_s_ap": s_ap_sum / valid,
                "mean_s_an": s_an_sum / valid}

    def _save_triplets(self, images: torch.Tensor, stats: TripletStats, epoch: int) -> None:
        """The batch's (S_ap, S_an) pairs before this step, and the same triplets' similarities after it.
        With several processes: the global batch's, its rows in rank order, written by rank 0."""
        with torch.no_grad(), frozen_batchnorm_statistics(self.model), autocast(self.device, self.amp_dtype):
            after = self.model(images)
        unit, own_rows = distributed.all_gather_rows(torch.nn.functional.normalize(after.float(), dim=1))
        pairs, triplets = stats.pairs, stats.triplets
        if self.world > 1:
            if not self.gather:  # rows of this process's share → rows of the global batch
                triplets = triplets + own_rows.start
            pairs = distributed.all_gather_rows(pairs.to(self.device))[0]
            triplets = distributed.all_gather_rows(triplets.to(self.device))[0]
        if not self.is_main:
            return
        unit, pairs, triplets = unit.cpu(), pairs.cpu().numpy(), triplets.cpu()
        anchor, positive, negative = triplets.unbind(dim=1)
        buffer = io.BytesIO()
        np.savez(buffer, s_ap=pairs[:, 0], s_an=pairs[:, 1], triplets=triplets.numpy(),
                 s_ap_after=(unit[anchor] * unit[positive]).sum(1).numpy(),
                 s_an_after=(unit[anchor] * unit[negative]).sum(1).numpy(),
                 iteration=self.iteration, epoch=epoch)
        atomic_write_bytes(self.run_dir / "triplets" / f"iter_{self.iteration:07d}.npz", buffer.getvalue())

    def evaluate(self, epoch: int) -> float | None:
        """Recall@K on unseen data with the metric code of ``sct eval``: leave-one-out, or query → gallery.
        With several processes each embeds a slice of the images with rank 0's weights and statistics, and
        rank 0 scores them all and returns Recall@K; the others return None."""
        distributed.broadcast_buffers(self.model)
        query_emb, query_labels = self._embed_shared(self.queries)
        gallery_emb, gallery_labels = self._embed_shared(self.gallery) if self.gallery is not None else (None, None)
        if not self.is_main:
            return None
        knn = knn_for(self.device)  # exact search on the GPU when training there
        if self.gallery is None:
            results = evaluate(query_emb, query_labels, ks=tuple(self.config.eval_ks), knn=knn)
        else:
            results = evaluate(gallery_emb, gallery_labels, ks=tuple(self.config.eval_ks),
                               query_emb=query_emb, query_labels=query_labels, knn=knn)
        results["mean_similarity"] = mean_pairwise_similarity(query_emb)
        self._log({"type": "eval", "epoch": epoch, "iter": self.iteration, "split": self.evaluated_split, **results})
        shown = "  ".join(f"R@{k} {results[f'recall@{k}']:.4f}" for k in self.config.eval_ks)
        print(f"epoch {epoch + 1}: {shown}  MAP@R {results['map@r']:.4f}  ({results['queries']} queries)")
        if results["mean_similarity"] > COLLAPSE_SIMILARITY:
            print(f"warning: the embedding looks collapsed: mean pairwise similarity "
                  f"{results['mean_similarity']:.3f} over the {self.evaluated_split} images. Every triplet is then "
                  "hard; with SGD, SCT's push on hard triplets (λ·S_an) is about 1/τ times weaker than NCA's and "
                  "may never escape. Try a larger --lr (SCT's tuned lr is several times SHN's), or for SCT a larger --lam; "
                  "see docs/hard-negatives/README.md.")
        return float(results[f"recall@{self.config.eval_ks[0]}"])

    def _embed_shared(self, records: list[catalog.ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings and labels of the readable ``records``, in order. With several processes each embeds
        its contiguous slice, and all of them get every row."""
        start, stop = ShardSpec(self.rank, self.world).bounds(len(records))
        embeddings, labels, failures = embed_records(self.model, records[start:stop], self.spec, self.device,
                                                     workers=self.config.workers, amp_dtype=self.amp_dtype)
        self._report_failures(failures)
        if self.world == 1:
            return embeddings, labels
        names = sorted({record.label for record in records})
        code = {name: i for i, name in enumerate(names)}
        if len(labels):
            vectors = torch.from_numpy(embeddings).to(self.device)
        else:  # every image of this slice was unreadable
            vectors = torch.zeros((0, self.config.dim), device=self.device)
        vectors, _ = distributed.all_gather_rows(vectors)
        codes, _ = distributed.all_gather_rows(torch.tensor([code[label] for label in labels], dtype=torch.long,
                                                            device=self.device))
        return vectors.cpu().numpy(), np.array(names)[codes.cpu().numpy()]

    def _report_failures(self, failures: list[str]) -> None:
        for failure in failures:
            tqdm.write(f"skipped unreadable image: {failure}")
        self.skipped_images += len(failures)

    def _watch_for_stall(self, record: dict[str, Any]) -> None:
        """Rank 0: feed the iteration to the stall detector; log a stall's start and end, and print them."""
        if not self.is_main:
            return
        change = self.stall.update(record["iter"], record["hard_fraction"], record["mean_s_ap"], record["mean_s_an"])
        if change is not None:
            self._log(change.log_line(record["epoch"]))
            tqdm.write(change.message())

    def _log(self, line: dict[str, Any]) -> None:
        """Append a line to metrics.jsonl (rank 0 only)."""
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps(line) + "\n")

    def _say(self, message: str) -> None:
        if self.is_main:
            print(message)

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, epoch: int, recall: float | None) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "iteration": self.iteration,
            "best_recall": self.best_recall,
            "config": self.config.to_dict(),
            "recall@1": recall,
        }
        if self.tree is not None:  # the tree this epoch trained with, so a resume can go on with it
            state["htl_tree"] = _tree_state(self.tree)
        payload = _serialise(state)
        atomic_write_bytes(self.run_dir / "last.pt", payload)
        if recall is None and (self.run_dir / "best.pt").exists():
            return
        if recall is None or recall > self.best_recall:
            self.best_recall = recall if recall is not None else self.best_recall
            state["best_recall"] = self.best_recall
            atomic_write_bytes(self.run_dir / "best.pt", _serialise(state))

    def _resume(self) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist; start without --resume")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.iteration = state["epoch"] + 1, state["iteration"]
        self.best_recall = state["best_recall"]
        if "htl_tree" in state and self.config.loss == "htl":
            self._use_tree(_tree_from_state(state["htl_tree"]))
        if self.is_main:
            for entry in _truncate_metrics(self.run_dir / "metrics.jsonl", self.iteration):
                if entry.get("type") is None:  # the detector's state is a function of the iterations logged
                    self.stall.update(entry["iter"], entry["hard_fraction"], entry["mean_s_ap"], entry["mean_s_an"])
        self._say(f"resumed from {path} after epoch {state['epoch'] + 1} (iteration {self.iteration})")


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: torch.nn.Module) -> Iterator[None]:
    """Inside, a train-mode forward pass normalises with batch statistics as training does,
    but leaves every BatchNorm's running averages (and batch counter) as they were."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            counter = module.num_batches_tracked.clone() if module.num_batches_tracked is not None else None
            saved.append((module, module.momentum, counter))
            module.momentum = 0.0  # running = (1 − 0)·running + 0·batch
    try:
        yield
    finally:
        for module, momentum, counter in saved:
            module.momentum = momentum
            if counter is not None:
                module.num_batches_tracked.copy_(counter)


def training_loader(dataset: RecordImages, sampler: Sampler, config: TrainConfig, device: torch.device, *,
                    stream: int = 0) -> DataLoader:
    """The DataLoader of every training epoch: ``config.workers`` decoding processes that persist across epochs,
    4 batches prefetched by each, batches pinned for the copy to CUDA. Each image's random crop and flip is drawn
    from its own seed (``SeededBatches``), so the batches depend on neither the number of workers nor a resume.
    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch."""
    workers = config.workers
    return DataLoader(dataset, batch_sampler=SeededBatches(sampler, config.seed, stream),
                      num_workers=workers, collate_fn=collate_skipping_failures,
                      generator=torch.Generator().manual_seed(config.seed * 1_000_003 + stream),
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def evaluation_splits(records: list[catalog.ImageRecord], dataset: str) -> tuple[list, list | None]:
    """(queries, gallery) for evaluation during training; gallery None means leave-one-out over the queries.

    The dataset's protocol in catalog.registry, the one `sct index` and `sct eval` follow: leave-one-out over
    "test" for CUB, Cars, SOP, Fashion-MNIST and folders; "query" → "gallery" for In-shop; "query" → "train"
    for Hotels-50K. No such split: nothing to evaluate on, ([], None).
    """
    return catalog.spec(dataset).evaluation_splits(records)


def _tree_state(tree: ClassTree) -> dict[str, Any]:
    """The class tree as tensors and numbers, which ``torch.load(weights_only=True)`` reads back."""
    return {"level_ids": torch.from_numpy(tree.level_ids), "thresholds": torch.from_numpy(tree.thresholds),
            "within": torch.from_numpy(tree.within), "d0": tree.d0, "neighbours": torch.from_numpy(tree.neighbours)}


def _tree_from_state(state: dict[str, Any]) -> ClassTree:
    return ClassTree(level_ids=state["level_ids"].numpy(), thresholds=state["thresholds"].numpy(),
                     within=state["within"].numpy(), d0=float(state["d0"]), neighbours=state["neighbours"].numpy())


def _serialise(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _truncate_metrics(path: Path, iteration: int) -> list[dict[str, Any]]:
    """Drop metric lines written after the checkpoint, so a resumed run's log reads like an unbroken one; returns
    the lines kept. An htl_tree line at the checkpoint's iteration belongs to the next epoch, which rebuilds it.
    A stall line carries the iteration whose step showed it, so it stays or goes with that step."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a full disk or a crash: it is after the checkpoint
            continue
    kept = [e for e in entries
            if (e["iter"] <= iteration if e.get("type") == "eval" else e["iter"] < iteration)]
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))
    return kept


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a model as ``config`` says; returns the run folder. Started by torchrun, this process joins the
    process group first (one GPU per process on CUDA) and leaves it at the end."""
    if not distributed.launched_by_torchrun():
        return Trainer(config, resume=resume, progress=progress).fit()
    distributed.init(config.dist_backend, pick_device(config.device, distributed.local_rank()))
    try:
        return Trainer(config, resume=resume, progress=progress).fit()
    finally:
        distributed.cleanup()
