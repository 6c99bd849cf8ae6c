"""The galleries an app serves, its search settings, and the per-worker state of its requests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flask import current_app

from core.errors import UserValueError
from retrieval.gallery import Gallery
from webapp.cache import LruCache
from webapp.compute import ComputePool
from webapp.errors import ApiError, quoted
from webapp.live import LiveGallery
from webapp.metrics import Metrics
from webapp.query_store import QueryStore

if TYPE_CHECKING:
    from webapp.pairs import ImageView


#: Images one search may send, unless the app is given another ``max_batch``.
DEFAULT_MAX_BATCH = 16
#: Uploads of the largest size one search may send together, unless the app is given another ``max_batch_bytes``.
BATCH_UPLOADS = 4


@dataclass(frozen=True)
class SearchSettings:
    """Everything the request handlers need, stored in ``app.extensions["sct"]``."""

    indexes: dict[str, LiveGallery]  # by name, in the order given; the first is the default
    default_k: int
    max_k: int
    max_pixels: int
    max_upload_bytes: int  # per image
    queries: LruCache[tuple[str, str], ImageView]  # views of uploaded queries, by (model sha256, query id)
    query_store: QueryStore  # the uploaded images of searches, by query id, for every worker and server
    item_views: LruCache[tuple, ImageView]  # gallery items embedded for heatmaps, by (model, file)
    metrics: Metrics
    compute: ComputePool  # where decoding, embedding and drawing run
    max_batch: int = DEFAULT_MAX_BATCH  # images one search may send
    max_batch_bytes: int | None = None  # the images of one search together; None: BATCH_UPLOADS × max_upload_bytes

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_batch_bytes is None:
            object.__setattr__(self, "max_batch_bytes", BATCH_UPLOADS * self.max_upload_bytes)
        if self.max_batch_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_batch_bytes ({self.max_batch_bytes:,}) must be at least max_upload_bytes "
                f"({self.max_upload_bytes:,})"
            )

    @property
    def default_index(self) -> str:
        return next(iter(self.indexes))

    def gallery(self, name: str | None, *, unknown_status: int) -> tuple[str, Gallery]:
        """The named gallery (the default one when no name is given), as of now: see LiveGallery."""
        name = name or self.default_index
        if name not in self.indexes:
            raise ApiError(unknown_status, f"unknown index {quoted(name)}; served: {', '.join(self.indexes)}")
        return name, self.indexes[name].current()


def load_indexes(
    index_dirs: Sequence[str | os.PathLike[str]], compute: ComputePool, providers: Sequence[str] | None = None
) -> dict[str, LiveGallery]:
    """Load each gallery folder (with the embedder for its own model.onnx, on ONNX Runtime's ``providers``, None
    for its default), keyed by folder name; reloads of a rebuilt folder run in ``compute``."""
    if not index_dirs:
        raise UserValueError("no gallery folder given")
    names = [Path(d).resolve().name for d in index_dirs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserValueError(f"gallery names must be unique; several folders are named {', '.join(duplicates)}")
    return {name: LiveGallery(directory, compute.run, providers) for name, directory in zip(names, index_dirs)}


def settings() -> SearchSettings:
    """The settings of the app handling the current request."""
    return current_app.extensions["sct"]
