"""A served gallery folder that follows ``sct index`` rebuilding it in place, without a restart.

``sct index`` replaces a gallery folder atomically (retrieval.atomic), so a new
manifest.json file appears exactly when a whole new gallery does. Each request
stats that file (microseconds); when it is not the file loaded, one request
thread loads the new folder while the others keep serving the old gallery.
The new gallery then replaces the old by a single reference swap: a request
holds the ``Gallery`` it started with until it ends, so nothing in flight
fails. A new folder that does not load is logged and the old gallery stays.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from PIL import Image

from retrieval.gallery import MANIFEST_FILE, Gallery

log = logging.getLogger(__name__)

#: What identifies one manifest.json file: a rebuilt folder's has a new inode.
Stamp = tuple[int, int, int, int]


class LiveGallery:
    """The latest good version of the gallery in ``directory``; ``current()`` is the one to serve now."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.name = self.directory.resolve().name
        self._stamp = _manifest_stamp(self.directory)
        self._gallery = _load(self.directory)  # errors here are fatal: nothing to fall back on
        self._reloading = threading.Lock()

    def current(self) -> Gallery:
        """The gallery to serve this request with, reloaded first if the folder was rebuilt."""
        if _manifest_stamp(self.directory) not in (None, self._stamp) and self._reloading.acquire(blocking=False):
            try:
                self._reload()
            finally:
                self._reloading.release()
        return self._gallery

    def _reload(self) -> None:
        stamp = _manifest_stamp(self.directory)
        if stamp is None or stamp == self._stamp:  # another thread reloaded it meanwhile
            return
        try:
            gallery = _load(self.directory)
        except Exception as exc:  # whatever breaks the new folder (mismatch, bad model), the old one keeps serving
            if _manifest_stamp(self.directory) == stamp:  # else it was replaced again meanwhile: retry that one
                self._stamp = stamp
                log.error("gallery %s was rebuilt but does not load; still serving the previous one: %s",
                          self.name, exc)
            return
        if _manifest_stamp(self.directory) != stamp:
            return  # replaced again while loading, so possibly read half old, half new: the next request retries
        self._gallery = gallery
        self._stamp = stamp
        log.info("gallery %s reloaded: %d items, model %s", self.name, len(gallery.items),
                 gallery.manifest["model_sha256"][:12])


def _load(directory: Path) -> Gallery:
    """Load a gallery and pay one-off costs before it serves a request: Gallery.load runs the model once
    (onnxruntime's first run), and Pillow's plugin registry is filled here."""
    gallery = Gallery.load(directory)
    Image.init()
    return gallery


def _manifest_stamp(directory: Path) -> Stamp | None:
    """Device, inode, mtime and size of manifest.json; None while the folder is being swapped (or is gone)."""
    try:
        status = os.stat(directory / MANIFEST_FILE)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size
