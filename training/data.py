"""Torch datasets over catalog records: unreadable images are skipped and counted, never fatal."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from catalog import ImageLoadError, ImageRecord, load_rgb
from training.precision import autocast

MIN_IMAGES_PER_CLASS = 2  # an anchor needs at least one positive


@dataclass
class Batch:
    images: Tensor
    labels: Tensor
    failures: list[str]  # "path: reason" of each image that could not be read


class RecordImages(Dataset):
    """Images of ``records`` with integer labels; an unreadable image yields its error instead.

    With ``cache``, each transformed image is kept in memory (as float16) after
    its first load, which only makes sense for a deterministic transform read
    in the main process: small datasets trained without augmentation on CPU.
    """

    def __init__(self, records: Sequence[ImageRecord], class_index: dict[str, int], transform: Callable,
                 *, cache: bool = False) -> None:
        self.records, self.class_index, self.transform = records, class_index, transform
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | str:
        record = self.records[index]
        label = self.class_index[record.label]
        if self.cache is not None and index in self.cache:
            return self.cache[index].float(), label
        try:
            image = self.transform(load_rgb(record.path))
        except ImageLoadError as error:
            return str(error)
        if self.cache is not None:
            self.cache[index] = image.half()
        return image, label


def collate_skipping_failures(items: list[tuple[Tensor, int] | str]) -> Batch:
    good = [item for item in items if not isinstance(item, str)]
    failures = [item for item in items if isinstance(item, str)]
    if not good:
        return Batch(torch.zeros(0), torch.zeros(0, dtype=torch.long), failures)
    return Batch(torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good]), failures)


def drop_small_classes(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """Records of classes with at least two images, and the names of the classes dropped."""
    counts = Counter(record.label for record in records)
    dropped = sorted(label for label, count in counts.items() if count < MIN_IMAGES_PER_CLASS)
    return [r for r in records if counts[r.label] >= MIN_IMAGES_PER_CLASS], dropped


def class_index_of(records: Sequence[ImageRecord]) -> dict[str, int]:
    return {label: i for i, label in enumerate(sorted({r.label for r in records}))}


@torch.no_grad()
def embed_records(model: torch.nn.Module, records: Sequence[ImageRecord], transform: Callable, device: torch.device,
                  *, batch_size: int = 256, workers: int = 0,
                  amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unit embeddings and labels of the readable records, plus the failures."""
    class_index = class_index_of(records)
    names = np.array(sorted(class_index))
    loader = DataLoader(RecordImages(records, class_index, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skipping_failures)
    was_training = model.training
    model.eval()
    embeddings, labels, failures = [], [], []
    for batch in loader:
        failures.extend(batch.failures)
        if len(batch.labels) == 0:
            continue
        images = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            output = model(images)
        embeddings.append(torch.nn.functional.normalize(output.float(), dim=1).cpu().numpy())
        labels.append(names[batch.labels.numpy()])
    model.train(was_training)
    if not embeddings:
        return np.zeros((0, 0), np.float32), np.array([], dtype=str), failures
    return np.concatenate(embeddings), np.concatenate(labels), failures
