"""A served gallery folder that follows ``sct index`` rebuilding or changing it (--add, --remove) in place, without
a restart.

``sct index`` replaces a gallery folder atomically (core.atomic), so its
files all change at once. Each request stats the files a gallery is loaded
from (microseconds); when they are not the files loaded, one request loads
the new folder (in a compute slot) while the others keep serving the old
gallery. The new gallery then replaces the old by a single reference swap: a
request holds the ``Gallery`` it started with until it ends, so nothing in
flight fails.

A folder that no longer loads (a broken rebuild, a file edited or deleted in
place) is logged, the last good gallery keeps serving, and ``problem`` says
what is wrong, for ``/healthz`` to report the gallery as degraded, until a
good folder replaces it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from retrieval.gallery import INDEX_FILE, MANIFEST_FILE, MODEL_FILE, REMOVED_FILE, Gallery
from retrieval.index_files import IVFDATA_FILE
from retrieval.items import ITEMS_FILE

log = logging.getLogger(__name__)

#: The files a gallery is loaded from (IVFDATA_FILE only for on-disk indexes, REMOVED_FILE only for an HNSW
#: index that items were removed from).
_GALLERY_FILES = (MANIFEST_FILE, INDEX_FILE, ITEMS_FILE, MODEL_FILE, IVFDATA_FILE, REMOVED_FILE)
#: What identifies one version of a gallery folder: (device, inode, mtime, size) of each of its files, or None
#: while it is being swapped or is missing its manifest.
Stamp = tuple[tuple[int, int, int, int] | None, ...]
Runner = Callable[..., Any]


class LiveGallery:
    """The latest good version of the gallery in ``directory``; ``current()`` is the one to serve now."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        run: Runner = lambda function, *args: function(*args),
        providers: Sequence[str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._providers = providers  # ONNX Runtime execution providers (None: Gallery.load's default)
        self.name = self.directory.resolve().name
        self._run = run
        self._stamp = _folder_stamp(self.directory)
        self._gallery = _load(self.directory, providers)  # errors here are fatal: nothing to fall back on
        self._problem: str | None = None
        self._reloading = threading.Lock()

    def current(self) -> Gallery:
        """The gallery to serve this request with, reloaded first if the folder was rebuilt."""
        if _folder_stamp(self.directory) != self._stamp and self._reloading.acquire(blocking=False):
            try:
                self._reload()
            finally:
                self._reloading.release()
        return self._gallery

    @property
    def problem(self) -> str | None:
        """Why the folder on disk is not what ``current()`` serves (None when it is); call it after ``current()``,
        which reloads a changed folder. The folder is stamped again here, so a deleted or half-replaced one
        shows at once."""
        stamp = _folder_stamp(self.directory)
        if stamp is None:
            return f"{self.directory.name}/{MANIFEST_FILE} is missing (being replaced, or deleted)"
        return self._problem if stamp == self._stamp else None

    def _reload(self) -> None:
        stamp = _folder_stamp(self.directory)
        if stamp is None or stamp == self._stamp:  # being swapped, or another request reloaded it meanwhile
            return
        try:
            gallery = self._run(_load, self.directory, self._providers)
        except Exception as exc:  # whatever breaks the new folder (mismatch, bad model), the old one keeps serving
            if _folder_stamp(self.directory) == stamp:  # else it was replaced again meanwhile: retry that one
                self._stamp = stamp
                self._problem = f"the gallery folder no longer loads, still serving the previous version: {exc}"
                log.error(
                    "gallery %s changed on disk but does not load; still serving the previous one: %s", self.name, exc
                )
            return
        if _folder_stamp(self.directory) != stamp:
            return  # replaced again while loading, so possibly read half old, half new: the next request retries
        self._gallery, self._stamp, self._problem = gallery, stamp, None
        log.info(
            "gallery %s reloaded: %d items, model %s",
            self.name,
            len(gallery.items),
            gallery.manifest["model_sha256"][:12],
        )


def _load(directory: Path, providers: Sequence[str] | None = None) -> Gallery:
    """Load a gallery and pay one-off costs before it serves a request: Gallery.load runs the model once
    (onnxruntime's first run), and Pillow's plugin registry is filled here."""
    gallery = Gallery.load(directory, providers=providers)
    Image.init()
    return gallery


def _folder_stamp(directory: Path) -> Stamp | None:
    """The stamp of the gallery's files; None while manifest.json is absent (the folder is being swapped)."""
    stamps = []
    for name in _GALLERY_FILES:
        try:
            status = os.stat(directory / name)
        except OSError:
            if name == MANIFEST_FILE:
                return None
            stamps.append(None)
            continue
        stamps.append((status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size))
    return tuple(stamps)
