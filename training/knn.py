"""Exact inner-product kNN with torch on the training device: Recall@K on the GPU while training runs there.

``TorchKnn`` has the signature and contract of ``retrieval.metrics.knn_exclude_self``
(the FAISS CPU search), so ``retrieval.metrics.evaluate(..., knn=TorchKnn(device))``
computes the same metrics, only the neighbour search moves to the device. The
gallery is copied to the device once and kept while the same array is
searched chunk after chunk. Similarities are computed in full fp32 (TF32 off
inside the search, whatever the process set) and at most ``max_block_bytes``
of them exist at once, so memory stays O(rows · N) for a bounded number of
rows, never N × N.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from retrieval.metrics import DEFAULT_CHUNK_SIZE, drop_self, knn_exclude_self, search_depth

MAX_BLOCK_BYTES = 1 << 30  # similarities held at once: 1 GiB, e.g. 4,473 queries × 60,000 items


class TorchKnn:
    """Exact top-k by inner product on ``device``; call it like ``knn_exclude_self``."""

    def __init__(self, device: torch.device | str, *, max_block_bytes: int = MAX_BLOCK_BYTES) -> None:
        self.device = torch.device(device)
        self.max_block_bytes = max_block_bytes
        self._source: np.ndarray | None = None  # the array whose device copy is cached
        self._gallery: torch.Tensor | None = None

    def __call__(
        self,
        gallery: np.ndarray,
        queries: np.ndarray,
        depth: int,
        query_ids: np.ndarray | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> tuple[np.ndarray, np.ndarray]:
        searched = search_depth(gallery, queries, depth, query_ids, chunk_size)
        on_device = self._on_device(gallery)
        rows_per_block = max(1, min(chunk_size, self.max_block_bytes // (4 * max(len(gallery), 1))))
        scores, ids = [], []
        with _full_fp32_matmul(), torch.no_grad():
            for start in range(0, len(queries), rows_per_block):
                block = torch.from_numpy(np.ascontiguousarray(queries[start : start + rows_per_block], np.float32))
                similarities = block.to(self.device, non_blocking=True) @ on_device.T
                top = torch.topk(similarities, searched, dim=1, sorted=True)
                scores.append(top.values.cpu().numpy())
                ids.append(top.indices.cpu().numpy())
        scores = np.concatenate(scores) if scores else np.zeros((0, searched), np.float32)
        ids = np.concatenate(ids).astype(np.int64) if ids else np.zeros((0, searched), np.int64)
        if query_ids is not None:
            scores, ids = drop_self(scores, ids, np.asarray(query_ids))
        return scores, ids

    def _on_device(self, gallery: np.ndarray) -> torch.Tensor:
        if self._source is not gallery or self._gallery is None:
            self._gallery = torch.from_numpy(np.ascontiguousarray(gallery, np.float32)).to(self.device)
            self._source = gallery
        return self._gallery


def knn_for(device: torch.device) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The exact search to evaluate with on ``device``: torch on CUDA, FAISS on the CPU (faster there)."""
    return TorchKnn(device) if device.type == "cuda" else knn_exclude_self


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """TF32 rounds the similarities to about 1e-3, enough to swap near neighbours: keep fp32 here."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
