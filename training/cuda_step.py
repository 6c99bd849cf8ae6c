"""The parts of the training loop that only a CUDA device uses: cuDNN's convolution autotuner, and a prefetcher
that copies the next batch to the device on a side stream while the current batch's step runs.

On any other device the trainer uses neither: its batches and settings are as they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def tune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms on the first batch of each shape and keep the fastest
    (the training batches all have one shape, but for the few with unreadable images). Elsewhere nothing."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def one_ahead(items: Iterable[T], start: Callable[[T], T], finish: Callable[[T], T]) -> Iterator[T]:
    """``finish(start(item))`` for each item, in order, with the next item's ``start`` issued before the current
    one is yielded: the next batch's copy is under way while the caller works on the current one."""
    iterator = iter(items)
    for first in iterator:
        pending = start(first)
        break
    else:
        return
    for item in iterator:
        upcoming = start(item)
        yield finish(pending)
        pending = upcoming
    yield finish(pending)


class CudaPrefetcher:
    """Copies batches (``training.data.Batch``: pinned images and labels) to a CUDA device on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, batch: T) -> T:
        with torch.cuda.stream(self.stream):
            images = batch.images.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True)
        return dataclasses.replace(batch, images=images, labels=labels)

    def finish(self, batch: T) -> T:
        """The batch, usable on the current stream once its copy is done (the current stream waits for it)."""
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        batch.images.record_stream(current)  # the side stream allocated them; the current stream frees them
        batch.labels.record_stream(current)
        return batch

    def __call__(self, batches: Iterable[T]) -> Iterator[T]:
        return one_ahead(batches, self.start, self.finish)
