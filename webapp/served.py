"""The galleries an app serves, and its search settings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flask import current_app
from PIL import Image

from retrieval.gallery import Gallery, GalleryItem


@dataclass(frozen=True)
class SearchSettings:
    """Everything the request handlers need, stored in ``app.extensions["sct"]``."""

    indexes: dict[str, Gallery]  # by name, in the order given; the first is the default
    default_k: int
    max_k: int
    max_pixels: int
    max_upload_bytes: int

    @property
    def default_index(self) -> str:
        return next(iter(self.indexes))


def load_indexes(index_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Gallery]:
    """Load each gallery folder (with the embedder for its own model.onnx), keyed by folder name."""
    if not index_dirs:
        raise ValueError("no gallery folder given")
    names = [Path(d).resolve().name for d in index_dirs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"gallery names must be unique; several folders are named {', '.join(duplicates)}")
    indexes = {name: Gallery.load(directory) for name, directory in zip(names, index_dirs)}
    _warm_up(indexes.values())
    return indexes


def _warm_up(galleries: Iterable[Gallery]) -> None:
    """Pay one-off costs (Pillow's plugin registry, onnxruntime's first run) before the first request."""
    Image.init()
    for gallery in galleries:
        size = gallery.embedder.preprocessing.image_size
        gallery.embedder.embed_images([Image.new("RGB", (size, size))])


def settings() -> SearchSettings:
    """The settings of the app handling the current request."""
    return current_app.extensions["sct"]


def item_file(item: GalleryItem) -> Path:
    """The image file of an item; relative paths in items.csv are relative to the working directory."""
    return Path(os.path.abspath(item.path))
