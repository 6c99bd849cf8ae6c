"""Embedding a list of images during training, shared between the processes, and counting the unreadable ones.

Evaluation embeds the test split and the HTL schedule the training split; both are large, so with several
processes each embeds a contiguous slice and all of them get every row (``SharedEmbedder``). Callers give every
process rank 0's BatchNorm statistics first (``distributed.broadcast_buffers``), so the rows do not depend on
which process embedded them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import catalog
from core.shards import ShardSpec
from retrieval.preprocessing import Preprocessing
from training import distributed
from training.data import embed_records, embedding_loader


class UnreadableImages:
    """Images that could not be decoded, wherever the run met them (training batches, evaluation, the class
    tree): each is printed when met and counted, and the run reports its total at the end."""

    def __init__(self) -> None:
        self.count = 0

    def report(self, failures: Sequence[str]) -> None:
        for failure in failures:
            tqdm.write(f"skipped unreadable image: {failure}")
        self.count += len(failures)


class SharedEmbedder:
    """Unit embeddings of records by a model, each process embedding its slice (see the module)."""

    def __init__(
        self,
        spec: Preprocessing,
        device: torch.device,
        *,
        dim: int,
        workers: int,
        amp_dtype: torch.dtype | None,
        unreadable: UnreadableImages,
    ) -> None:
        self.spec, self.device, self.dim, self.workers, self.amp_dtype = spec, device, dim, workers, amp_dtype
        self.unreadable = unreadable
        self.kept: dict[int, tuple[Sequence[catalog.ImageRecord], DataLoader]] = {}  # by id of the records' list

    def __call__(
        self, model: torch.nn.Module, records: Sequence[catalog.ImageRecord], *, keep: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings and labels of the readable ``records``, in order, on every process. ``keep`` (the
        evaluation's records, embedded again at every evaluation): this list's loader is kept, with persistent
        workers and the crops cached (``training.data.embedding_loader``), so later calls decode nothing."""
        rank, world = distributed.rank(), distributed.world_size()
        start, stop = ShardSpec(rank, world).bounds(len(records))
        loader = None
        if keep:
            if id(records) not in self.kept:  # the list is held too, so its id stays its own
                made = embedding_loader(records[start:stop], self.spec, self.device, workers=self.workers, keep=True)
                self.kept[id(records)] = (records, made)
            loader = self.kept[id(records)][1]
        embeddings, labels, failures = embed_records(
            model,
            records[start:stop],
            self.spec,
            self.device,
            workers=self.workers,
            amp_dtype=self.amp_dtype,
            loader=loader,
        )
        self.unreadable.report(failures)
        if world == 1:
            return embeddings, labels
        names = sorted({record.label for record in records})
        code = {name: i for i, name in enumerate(names)}
        if len(labels):
            vectors = torch.from_numpy(embeddings).to(self.device)
        else:  # every image of this slice was unreadable
            vectors = torch.zeros((0, self.dim), device=self.device)
        vectors, _ = distributed.all_gather_rows(vectors)
        codes, _ = distributed.all_gather_rows(
            torch.tensor([code[label] for label in labels], dtype=torch.long, device=self.device)
        )
        return vectors.cpu().numpy(), np.array(names)[codes.cpu().numpy()]
