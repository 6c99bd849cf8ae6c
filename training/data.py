"""Torch datasets over catalog records: unreadable images are skipped and counted, never fatal."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm import tqdm

from catalog import ImageLoadError, ImageRecord, load_rgb
from retrieval.preprocessing import Preprocessing
from training.precision import autocast
from training.transforms import TRAIN_RESIZE_FACTOR, Normalizer, eval_pixels

MIN_IMAGES_PER_CLASS = 2  # an anchor needs at least one positive


@dataclass(frozen=True)
class Unreadable:
    """What ``RecordImages`` yields in place of an image that could not be read (picklable, unlike the error)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return str(ImageLoadError(self.path, self.reason))


@dataclass
class Batch:
    images: Tensor
    labels: Tensor
    kept: list[int] = field(default_factory=list)  # positions, among the batch's items, of the rows of images
    unreadable: list[Unreadable] = field(default_factory=list)  # the items that could not be read

    @property
    def failures(self) -> list[str]:
        """Each image that could not be read, as 'cannot load image PATH: reason'."""
        return [str(item) for item in self.unreadable]

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with ``pin_memory=True`` (it does not look inside dataclasses itself)."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


class RecordImages(Dataset):
    """Images of ``records`` with integer labels; an unreadable image yields its error instead.

    With ``cache``, each transformed image is kept in memory as the transform
    returns it (uint8 pixels from ``training.transforms``) after its first
    load, which only makes sense for a deterministic transform read in the
    main process: small datasets trained without augmentation on CPU.

    With ``min_side`` (training only: ``training_decode_side``), a large JPEG is decoded at a reduced scale by
    its DCT (Pillow's draft) and box-reduced, its shorter side kept at least ``min_side`` (``catalog.load_rgb``);
    without it (evaluation, whose embeddings must match the exported model's) every image is decoded whole.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_index: dict[str, int],
        transform: Callable,
        *,
        cache: bool = False,
        min_side: int | None = None,
    ) -> None:
        self.records, self.class_index, self.transform = records, class_index, transform
        self.cache: dict[int, Tensor] | None = {} if cache else None
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int] | Unreadable:
        """Image ``item``, or with ``(index, seed)`` (from ``SeededBatches``) its random transform drawn from seed."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        record = self.records[index]
        label = self.class_index[record.label]
        if self.cache is not None and index in self.cache:
            return self.cache[index], label
        try:
            image = load_rgb(record.path, min_side=self.min_side)
            with _seeded_torch_rng(seed):
                image = self.transform(image)
        except ImageLoadError as error:
            return Unreadable(record.path, error.reason)
        if self.cache is not None:
            self.cache[index] = image
        return image, label


class SeededBatches(Sampler):
    """A batch sampler's batches, each index paired with the seed of its random transform.

    The seeds come from (seed, stream, epoch, batch, position) alone, so the
    augmentations do not depend on which worker process reads an image or on
    how many there are. That is what lets one DataLoader with persistent
    workers serve every epoch while a resumed run still draws the same
    augmentations as an unbroken one. ``stream`` separates processes (the rank).
    """

    def __init__(self, batches: Sampler, seed: int, stream: int = 0) -> None:
        self.batches, self.seed, self.stream, self.epoch = batches, seed, stream, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for number, batch in enumerate(self.batches):
            seeds = np.random.SeedSequence([self.seed, self.stream, self.epoch, number]).generate_state(len(batch))
            yield [(int(index), int(seed)) for index, seed in zip(batch, seeds)]


TRAIN_DECODE_MARGIN = 2  # a training image is decoded to at least twice the side it is resized to


def training_decode_side(spec: Preprocessing, augment: bool) -> int:
    """The shorter side a training image is decoded to at least: TRAIN_DECODE_MARGIN times the side the training
    transform resizes it to (Resize(1.1 × size) with augmentation, the evaluation resize without). Resizing then
    still reads at least twice its output's pixels per side; decoding a 2,000 × 1,500 JPEG for 224-pixel crops
    reads a quarter of its pixels."""
    resized = int(spec.image_size * TRAIN_RESIZE_FACTOR) if augment else spec.resize_size
    return TRAIN_DECODE_MARGIN * resized


@contextlib.contextmanager
def _seeded_torch_rng(seed: int | None) -> Iterator[None]:
    """torch's global RNG (which torchvision's random transforms draw from) seeded with ``seed``; in the main
    process the previous state comes back afterwards. None: leave it alone."""
    # torch.default_generator, not torch.manual_seed: that one also queues CUDA seeding with a stack trace,
    # about 1 ms a call, a fifth of the demo's training time when done for every image
    if seed is None:
        yield
    elif get_worker_info() is not None:  # a DataLoader worker: its RNG serves nothing else
        torch.default_generator.manual_seed(seed)
        yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


def collate_skipping_failures(items: list[tuple[Tensor, int] | Unreadable]) -> Batch:
    kept = [i for i, item in enumerate(items) if not isinstance(item, Unreadable)]
    unreadable = [item for item in items if isinstance(item, Unreadable)]
    if not kept:
        return Batch(torch.zeros(0), torch.zeros(0, dtype=torch.long), kept, unreadable)
    good = [items[i] for i in kept]
    return Batch(
        torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good]), kept, unreadable
    )


def drop_small_classes(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """Records of classes with at least two images, and the names of the classes dropped."""
    counts = Counter(record.label for record in records)
    dropped = sorted(label for label, count in counts.items() if count < MIN_IMAGES_PER_CLASS)
    return [r for r in records if counts[r.label] >= MIN_IMAGES_PER_CLASS], dropped


def class_index_of(records: Sequence[ImageRecord]) -> dict[str, int]:
    return {label: i for i, label in enumerate(sorted({r.label for r in records}))}


@dataclass(frozen=True)
class EmbeddedRecords:
    """What ``embed_records_kept`` returns: the rows of the readable records, and where they came from."""

    embeddings: np.ndarray  # float32 [K, d], unit vectors ([0, 0] when no record was readable)
    labels: np.ndarray  # class names of the K rows
    kept: np.ndarray  # int64 [K], positions in the input records of the K rows
    unreadable: list[Unreadable]  # the records skipped, in input order


def embed_records(
    model: torch.nn.Module,
    records: Sequence[ImageRecord],
    spec: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    loader: DataLoader | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unit embeddings and labels of the readable records (preprocessed as ``spec`` says), plus the failures;
    ``loader`` as in ``embed_records_kept``."""
    result = embed_records_kept(
        model, records, spec, device, batch_size=batch_size, workers=workers, amp_dtype=amp_dtype, loader=loader
    )
    return result.embeddings, result.labels, [str(failure) for failure in result.unreadable]


def _eval_cache_bytes() -> int:
    """16 GiB, or a quarter of the machine's memory when that is less: a 24 GiB machine keeps 6 GiB of crops."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30
    return min(16 * 2**30, physical // 4)


#: at most this much of a process's evaluation crops are kept in memory (uint8)
EVAL_CACHE_BYTES = _eval_cache_bytes()


def embedding_loader(
    records: Sequence[ImageRecord],
    spec: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    prefetch_factor: int | None = None,
    keep: bool = False,
    cache_bytes: int = EVAL_CACHE_BYTES,
) -> DataLoader:
    """The DataLoader ``embed_records_kept`` reads ``records`` with, in order. With ``keep`` (a loader used for
    every evaluation of a run) its worker processes persist, and when the records' uint8 crops fit in
    ``cache_bytes`` each image's crop is kept after its first decode where it was decoded (the main process, or
    the worker that reads its batch: the batches go to the workers in the same turn at every pass)."""
    crop_bytes = 3 * spec.image_size * spec.image_size
    cache = keep and len(records) * crop_bytes <= cache_bytes
    return DataLoader(
        RecordImages(records, class_index_of(records), eval_pixels(spec), cache=cache),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skipping_failures,
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=keep and workers > 0,
    )


@torch.no_grad()
def embed_records_kept(
    model: torch.nn.Module,
    records: Sequence[ImageRecord],
    spec: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    prefetch_factor: int | None = None,
    progress: bool = False,
    desc: str = "embedding",
    loader: DataLoader | None = None,
) -> EmbeddedRecords:
    """``embed_records``, also saying which record each row is; optionally with a progress bar (images/s).

    The records are read in order (one pass, no shuffling), so the positions of
    a batch's items follow from the number of items before it. Batches travel
    as uint8 (pinned on CUDA, copied without blocking) and are normalised on
    the device. ``loader``: one made by ``embedding_loader`` for these records, kept between calls.
    """
    class_index = class_index_of(records)
    names = np.array(sorted(class_index))
    normalize = Normalizer(spec)
    if loader is None:
        loader = embedding_loader(
            records, spec, device, batch_size=batch_size, workers=workers, prefetch_factor=prefetch_factor
        )
    was_training = model.training
    model.eval()
    embeddings, labels, kept, unreadable = [], [], [], []
    offset = 0
    with tqdm(
        total=len(records), unit="img", desc=desc, disable=not progress, dynamic_ncols=True, mininterval=0.5
    ) as bar:
        for batch in loader:
            kept.extend(offset + i for i in batch.kept)
            unreadable.extend(batch.unreadable)
            offset += len(batch.kept) + len(batch.unreadable)
            bar.update(len(batch.kept) + len(batch.unreadable))
            if unreadable:
                bar.set_postfix(skipped=len(unreadable), refresh=False)
            if len(batch.labels) == 0:
                continue
            images = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                output = model(normalize(images))
            embeddings.append(torch.nn.functional.normalize(output.float(), dim=1).cpu().numpy())
            labels.append(names[batch.labels.numpy()])
    model.train(was_training)
    if not embeddings:
        return EmbeddedRecords(np.zeros((0, 0), np.float32), np.array([], dtype=str), np.zeros(0, np.int64), unreadable)
    return EmbeddedRecords(
        np.concatenate(embeddings), np.concatenate(labels), np.asarray(kept, dtype=np.int64), unreadable
    )
