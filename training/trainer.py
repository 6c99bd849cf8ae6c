"""The training loop: P×K batches, a mined triplet loss, SGD, Recall@K on the test split, atomic checkpoints.

With --loss htl, a class tree is built from the current model before the first epoch and then every
htl_rebuild_every epochs (training.htl_schedule); it sets the loss's margins and the sampler's class groups.

Launched by torchrun, each process trains on its share of every global batch (whole classes, training.sampler)
under DistributedDataParallel (training.distributed). Every process embeds its slice of the evaluation images;
rank 0 alone scores them, writes the run folder, builds the HTL class tree (and hands it to the others) and
shows progress; the others wait for it at a barrier.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import catalog
from core.cpus import processes_on_this_machine
from core.errors import UserValueError
from retrieval.preprocessing import Preprocessing
from training import distributed
from training.config import TrainConfig
from training.cuda_step import CudaPrefetcher, tune_convolutions
from training.data import (
    RecordImages,
    SeededBatches,
    class_index_of,
    collate_skipping_failures,
    drop_small_classes,
    training_decode_side,
)
from training.evaluator import Evaluator
from training.htl_schedule import HTLSchedule
from training.losses import SCTLoss, build_loss, warm_start_weight
from training.model import build_model
from training.precision import apply_fp32_policy, autocast, make_deterministic, training_autocast_dtype
from training.run_folder import LAST, RunFolder
from training.sampler import HTLBatchSampler, PKBatchSampler
from training.shared_embedding import SharedEmbedder, UnreadableImages
from training.stall import StallDetector, StallWatch, stall_window
from training.step_stats import step_summary, triplet_snapshot
from training.transforms import Normalizer, eval_pixels, train_pixels


def pick_device(requested: str, index: int | None = None) -> torch.device:
    """The CPU or CUDA device ("auto": CUDA when present), ``index`` picking the GPU (a process's local rank).
    A request that cannot be met is a ValueError, which the command line reports in one line."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserValueError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if index is None:
        return torch.device("cuda")
    if index >= torch.cuda.device_count():
        raise UserValueError(f"LOCAL_RANK is {index}, but torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def preprocessing_of(config: TrainConfig) -> Preprocessing:
    return Preprocessing(
        image_size=config.image_size, resize_size=config.image_size, mean=tuple(config.mean), std=tuple(config.std)
    )


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(iteration: int, config: TrainConfig, iters_per_epoch: int) -> float:
    """Learning-rate multiplier at ``iteration``: linear warm-up, then step (per epoch) or cosine decay."""
    warmup = min(1.0, (iteration + 1) / config.warmup_iters) if config.warmup_iters else 1.0
    total = config.epochs * iters_per_epoch
    if config.schedule == "cosine":
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
    epoch = iteration // iters_per_epoch
    passed = sum(epoch >= round(m * config.epochs) for m in config.milestones)
    return warmup * config.gamma**passed


def build_sampler(
    labels: list[int], num_classes: int, config: TrainConfig, *, rank: int = 0, world_size: int = 1
) -> PKBatchSampler:
    """P×K batches, or for --loss htl anchor-neighbour batches of l′ = batch_size // (m·t) groups of m classes;
    fewer classes per batch when the training split has fewer. ``batch_size`` is the global batch: with several
    processes, process ``rank`` gets its share of whole classes (whole groups for HTL)."""
    t = config.images_per_class
    if config.loss == "htl":
        m = min(config.htl_neighbours, num_classes)
        groups = max(1, min(config.batch_size // (config.htl_neighbours * t), num_classes // m))
        return HTLBatchSampler(labels, groups, m, t, seed=config.seed, rank=rank, world_size=world_size)
    return PKBatchSampler(
        labels, min(config.batch_size // t, num_classes), t, seed=config.seed, rank=rank, world_size=world_size
    )


class Trainer:
    """One run: ``Trainer(config).fit()`` writes everything into ``config.out``.

    Constructing it reads the dataset and builds the model, loss, sampler and optimizer, but writes nothing: the
    run folder is created (and, with ``resume``, last.pt read back) when the run starts, at the first ``fit`` or
    ``evaluate``. The loop is here; its parts are the run folder (training.run_folder), the evaluator
    (training.evaluator), the HTL class-tree schedule (training.htl_schedule), the stall watch (training.stall)
    and the per-step statistics (training.step_stats). None of them holds the Trainer: see the scheduler below.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config, self.progress, self.resume = config, progress, resume
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.gather = config.gather_embeddings and self.world > 1
        self.run = RunFolder(config.out, writes=self.is_main)
        self.device = pick_device(config.device, distributed.gpu_index(config.share_gpus) if self.world > 1 else None)
        tune_convolutions(self.device)  # --deterministic, applied below, turns the autotuner off again
        _seed_everything(config.seed)

        records = catalog.read_dataset(config.dataset, config.data_root)
        if config.val_fraction:
            records = catalog.carve_validation(records, config.val_fraction, by=config.val_by)
        self._say(catalog.summarize(records))
        self.train_records, dropped = drop_small_classes(catalog.select_split(records, "train"))
        if dropped:
            self._say(f"dropped {len(dropped)} class(es) with fewer than 2 training images: {', '.join(dropped[:10])}")
        if not self.train_records:
            raise UserValueError(f"dataset {config.dataset} at {config.data_root} has no usable training images")
        queries, gallery = evaluation_splits(records, config.dataset)
        evaluated_split = "test"
        if config.val_fraction:
            queries, gallery = catalog.select_split(records, catalog.VALIDATION_SPLIT), None
            evaluated_split = catalog.VALIDATION_SPLIT
            self._say(
                f"evaluating on {len(queries)} held-out training images "
                f"({len({r.label for r in queries})} classes), not on the test split"
            )
        self.spec = preprocessing_of(config)
        self.class_index = class_index_of(self.train_records)
        labels = [self.class_index[r.label] for r in self.train_records]
        self.sampler = build_sampler(labels, len(self.class_index), config, rank=self.rank, world_size=self.world)
        transform = train_pixels(self.spec) if config.augment else eval_pixels(self.spec)
        self.normalize = Normalizer(self.spec)  # the loader's uint8 batches → model input, on the device
        cache = config.cache_images and not config.augment and config.workers == 0
        if config.cache_images and not cache:
            self._say("note: cache_images is ignored: it needs augment: false and workers: 0")
        self.dataset = RecordImages(
            self.train_records,
            self.class_index,
            transform,
            cache=cache,
            min_side=training_decode_side(self.spec, config.augment),  # large JPEGs decoded at a reduced scale
        )
        self.iters_per_epoch = min(len(self.sampler), config.max_iters_per_epoch or len(self.sampler))
        self.total_iterations = config.epochs * self.iters_per_epoch
        self.stall = StallWatch(StallDetector(stall_window(self.total_iterations)), self.run.log, active=self.is_main)
        self.loader: DataLoader | None = None  # made at the first epoch; its worker processes serve every epoch

        model = build_model(
            config.arch,
            config.dim,
            config.pretrained,
            embedding_bn=config.embedding_bn,
            trunk_stages=config.trunk_stages,
            last_stride=config.last_stride,
        )
        if config.sync_batchnorm and self.world > 1:
            model = distributed.convert_sync_batchnorm(model, self.device)
        # self.model is the bare model: evaluation, the HTL tree, checkpoints and the triplet re-measurement use
        # it; training steps go through self.train_model: DistributedDataParallel around it when several train,
        # torch.compile around that with --compile. They share the parameters.
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        apply_fp32_policy(config.precision)  # fp32 means fp32: no TF32 on CUDA
        if config.deterministic:
            make_deterministic()
        self.amp_dtype, precision_note = training_autocast_dtype(
            self.model, self.device, config.precision, config.image_size
        )
        if precision_note:
            self._say(precision_note)
        self.unreadable = UnreadableImages()
        embed = SharedEmbedder(
            self.spec,
            self.device,
            dim=config.dim,
            workers=config.workers,
            # fp32, whatever the training precision: Recall@K, best.pt and the HTL tree come from the embeddings
            # that the exported fp32 model serves, not from bf16 ones that swap near-ties (decoding, not the
            # model, bounds an evaluation's speed on a GPU)
            amp_dtype=None,
            unreadable=self.unreadable,
        )
        self.evaluator = Evaluator(queries, gallery, evaluated_split, config.eval_ks, embed, self.run)
        self.loss_fn = build_loss(
            config.loss,
            lam=config.lam,
            temperature=config.temperature,
            hard_threshold=config.hard_threshold,
            margin=config.margin,
            htl_beta=config.htl_beta,
            hard_floor=config.hard_floor,
            sct_warm_loss=config.sct_warm_loss,
        )
        self.htl = (
            HTLSchedule(config, self.train_records, self.class_index, self.loss_fn, self.sampler, embed, self.run)
            if config.loss == "htl"
            else None
        )
        self.optimizer = build_optimizer(self.model, config)
        # The schedule must not hold self: a Trainer in a reference cycle outlives train(), and its DDP wrapper keeps
        # the gloo process group's threads alive past destroy_process_group(), to be killed at interpreter exit,
        # which can abort the process after the run is written. The parts above hold no Trainer either.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, config=config, iters_per_epoch=self.iters_per_epoch)
        )
        self.start_epoch, self.iteration, self.best_recall = 0, 0, -1.0
        self.started = False
        self.train_model = distributed.wrap(self.model, self.device)
        if config.compile:  # around DDP, so that TorchDynamo's DDPOptimizer keeps gradient buckets overlapping
            self.train_model = torch.compile(self.train_model)

    # ---------------------------------------------------------------- running
    def fit(self) -> Path:
        config = self.config
        self._start()
        try:
            for epoch in range(self.start_epoch, config.epochs):
                if self.htl is not None and self.htl.due(epoch):
                    self.htl.rebuild(self.model, epoch, self.iteration)
                self._train_epoch(epoch)
                is_last = epoch == config.epochs - 1
                recall = None
                if self.evaluator.queries and (is_last or (config.eval_every and (epoch + 1) % config.eval_every == 0)):
                    recall = self.evaluate(epoch)  # every process embeds its share; rank 0 scores
                self.best_recall = self.run.save_checkpoint(self._checkpoint(epoch, recall), recall)
                distributed.barrier()
        finally:
            self.loader = None  # stops its persistent worker processes
            self.evaluator.embed.kept.clear()  # and the evaluation loaders'
            self.run.close()
        skipped = int(distributed.all_reduce_sum(torch.tensor(self.unreadable.count, device=self.device)))
        if skipped:
            self._say(f"skipped {skipped} unreadable training image(s) in all")
        return self.run.path

    def evaluate(self, epoch: int) -> float | None:
        """Recall@K on unseen data (training.evaluator): on rank 0 the first K's, None on the others."""
        self._start()
        try:
            return self.evaluator.evaluate(self.model, epoch, self.iteration)
        finally:
            self.run.close()  # metrics.jsonl stays open through the training steps, not past an evaluation

    def _start(self) -> None:
        """Once, before the first epoch or evaluation: the run folder and config.yaml, then a fresh metrics.jsonl,
        or with ``resume`` the state of last.pt and the log up to it."""
        if self.started:
            return
        self.started = True
        self.run.create(self.config)
        if self.resume:
            self._resume()
        else:
            self.run.start_metrics()

    def _resume(self) -> None:
        state = self.run.load_checkpoint(self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.iteration = state["epoch"] + 1, state["iteration"]
        self.best_recall = state["best_recall"]
        if "htl_tree" in state and self.htl is not None:
            self.htl.load_state(state["htl_tree"])
        self.stall.replay(self.run.truncate_metrics(self.iteration))
        self._say(f"resumed from {self.run.path / LAST} after epoch {state['epoch'] + 1} (iteration {self.iteration})")

    def _checkpoint(self, epoch: int, recall: float | None) -> dict[str, Any]:
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
        tree = self.htl.state() if self.htl is not None else None
        if tree is not None:  # the tree this epoch trained with, so a resume can go on with it
            state["htl_tree"] = tree
        return state

    def _train_epoch(self, epoch: int) -> None:
        config = self.config
        torch.manual_seed(config.seed * 100_003 + epoch + 1_000_003 * self.rank)  # each process its own stream
        if self.loader is None:
            self.loader = training_loader(self.dataset, self.sampler, config, self.device, stream=self.rank)
        self.loader.batch_sampler.set_epoch(epoch)
        loader = self.loader
        if self.device.type == "cuda":  # the next batch's copy overlaps this step
            loader = CudaPrefetcher(self.device)(itertools.islice(loader, self.iters_per_epoch))
        self.model.train()
        bar = tqdm(
            total=self.iters_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="it",
            disable=not (self.progress and self.is_main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= self.iters_per_epoch:
                break
            self.unreadable.report(batch.failures)
            # every process must take the step or none: skip it when any process holds fewer than 2 images
            sizes = distributed.gather_sizes(len(batch.labels), self.device)
            if min(sizes) < 2:
                continue
            record = self._train_step(batch, epoch)
            now = time.perf_counter()
            record["images_per_s"] = sum(sizes) / max(now - started, 1e-9)  # the global batch
            started = now
            self.run.log(record)
            self.stall.step(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                hard=f"{record['hard_fraction']:.2f}",
                img_s=f"{record['images_per_s']:.0f}",
                refresh=False,  # the bar redraws at its own pace (mininterval), not at every step
            )
            bar.update()
        bar.close()

    def _train_step(self, batch: Any, epoch: int) -> dict[str, Any]:
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        images = self.normalize(images.contiguous(memory_format=torch.channels_last))
        if isinstance(self.loss_fn, SCTLoss):
            self.loss_fn.sct_weight = warm_start_weight(self.iteration / self.total_iterations, self.config.sct_warmup)
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
            snapshot = triplet_snapshot(
                self.model, images, stats, gathered=self.gather, device=self.device, amp_dtype=self.amp_dtype
            )
            if snapshot is not None:
                self.run.save_triplets(self.iteration, epoch, snapshot)
        record = {"iter": self.iteration, "epoch": epoch, **step_summary(loss, stats, self.device), "lr": lr}
        self.iteration += 1
        return record

    def _say(self, message: str) -> None:
        if self.is_main:
            print(message)


PREFETCH_FACTOR = 4  # batches each training loader worker prepares ahead, when shared memory holds them
SHARED_MEMORY = "/dev/shm"


def training_loader(
    dataset: RecordImages, sampler: Sampler, config: TrainConfig, device: torch.device, *, stream: int = 0
) -> DataLoader:
    """The DataLoader of every training epoch: ``config.workers`` decoding processes that persist across epochs,
    4 batches prefetched by each, batches pinned for the copy to CUDA. Each image's random crop and flip is drawn
    from its own seed (``SeededBatches``), so the batches depend on neither the number of workers nor a resume.
    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch. Fewer batches are prefetched when
    /dev/shm cannot hold them all (``fitting_prefetch_factor``)."""
    workers = config.workers
    prefetch = None
    if workers:
        batch_bytes = max(1, config.batch_size // distributed.world_size()) * 3 * config.image_size**2
        prefetch, note = fitting_prefetch_factor(batch_bytes, workers, processes=processes_on_this_machine())
        if note:
            print(note, flush=True)
    return DataLoader(
        dataset,
        batch_sampler=SeededBatches(sampler, config.seed, stream),
        num_workers=workers,
        collate_fn=collate_skipping_failures,
        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + stream),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch,
    )


def fitting_prefetch_factor(
    batch_bytes: int,
    workers: int,
    *,
    processes: int = 1,
    wanted: int = PREFETCH_FACTOR,
    shared_memory: str = SHARED_MEMORY,
) -> tuple[int, str | None]:
    """The batches each DataLoader worker may prefetch, and a note when that is fewer than ``wanted``.

    A worker hands each batch over in shared memory (/dev/shm on Linux), and each of the ``processes`` on this
    machine has ``workers`` workers with up to the prefetch factor of batches of ``batch_bytes`` outstanding. A
    container's /dev/shm can be as small as 64 MB, and running out of it kills a worker with a bus error in the
    middle of a run. So the factor is lowered (down to 1) to what the free space holds, and when even one batch
    per worker does not fit, this is a UserValueError naming the sizes. No /dev/shm: ``wanted``, unchecked.
    """
    try:
        free = shutil.disk_usage(shared_memory).free
    except OSError:
        return wanted, None
    per_batch_each = batch_bytes * workers * processes
    fitting = min(wanted, free // per_batch_each)
    if fitting >= wanted:
        return wanted, None
    sizes = (
        f"{processes} process(es) × {workers} loader worker(s) × {batch_bytes / 2**20:.1f} MiB a batch "
        f"= {per_batch_each / 2**20:.1f} MiB a prefetched batch each, and {free / 2**20:.1f} MiB free in {shared_memory}"
    )
    if fitting < 1:
        raise UserValueError(
            f"the training loader does not fit in shared memory: {sizes}; use fewer --workers or a smaller "
            f"--batch-size, or give {shared_memory} more space (docker run --shm-size)"
        )
    return int(fitting), f"note: {fitting} batch(es) prefetched per loader worker, not {wanted}: {sizes}"


def evaluation_splits(records: list[catalog.ImageRecord], dataset: str) -> tuple[list, list | None]:
    """(queries, gallery) for evaluation during training; gallery None means leave-one-out over the queries.

    The dataset's protocol in catalog.registry, the one `sct index` and `sct eval` follow: leave-one-out over
    "test" for CUB, Cars, SOP, Fashion-MNIST and folders; "query" → "gallery" for In-shop; "query" → "train"
    for Hotels-50K. No such split: nothing to evaluate on, ([], None).
    """
    return catalog.spec(dataset).evaluation_splits(records)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train a model as ``config`` says; returns the run folder. Started by torchrun, this process joins the
    process group first (one GPU per process on CUDA, unless ``share_gpus``) and leaves it after a successful run."""
    if not distributed.launched_by_torchrun():
        return Trainer(config, resume=resume, progress=progress).fit()
    device = pick_device(config.device, distributed.gpu_index(config.share_gpus))
    distributed.init(config.dist_backend, device, shared_gpu=distributed.shares_a_gpu(device, config.share_gpus))
    # The group is left only after a successful run. A process that failed exits with its error without
    # destroying it: its peers may be waiting in a collective, and tearing down a group under them can block
    # (NCCL's abort), so torchrun would never see this process end. torchrun stops the others when it exits.
    run = Trainer(config, resume=resume, progress=progress).fit()
    distributed.cleanup()
    return run
