"""The uploaded query images of recent searches, on disk by content id, for every worker and server to read.

A search by upload names its query by the SHA-256 of the uploaded bytes (64
lowercase hexadecimal digits: the ``query_id``) and writes those bytes to a
folder as ``<query_id>`` (atomically, through core.atomic). The heatmaps of
that query can then be drawn by any worker process, and by any server given the
same folder, which embeds the bytes again with its gallery's model: the id
carries no state of the process that ran the search.

The folder is bounded: an entry older than ``max_age_s`` (since the last search
of that image) is no longer read, and the oldest entries are removed when the
folder holds more than ``max_bytes``. A process sweeps the folder after writing
a sixteenth of ``max_bytes`` since its last sweep, so between sweeps the folder
may exceed the bound by that much per process. Writers do not coordinate: two
processes storing the same image write the same bytes, and a file removed by
another process's sweep is a miss. Every read checks the file's hash, so a
damaged or replaced file is a miss too, never another image.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path

from core.atomic import atomic_write_bytes
from core.errors import UserValueError

QUERY_ID = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


def query_id_of(data: bytes) -> str:
    """The content id of an uploaded image: the SHA-256 of its bytes, in hexadecimal."""
    return hashlib.sha256(data).hexdigest()


def is_query_id(text: str) -> bool:
    return QUERY_ID.fullmatch(text) is not None


def default_query_store() -> Path:
    """``<temp dir>/sct-serve-queries-<user>``: shared by the servers of one user on one machine."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"sct-serve-queries-{user}"


class QueryStore:
    """Uploaded images by content id in ``directory``, at most ``max_bytes`` in all, each for ``max_age_s``."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age_s: float,
    ) -> None:
        if max_bytes < 1 or max_age_s <= 0:
            raise ValueError(f"max_bytes and max_age_s must be positive, got {max_bytes} and {max_age_s}")
        self.directory, self.max_bytes, self.max_age_s = Path(directory), max_bytes, max_age_s
        self._written_since_sweep = 0
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserValueError(f"cannot create the query store {self.directory}: {exc.strerror}") from None
        if not self.directory.is_dir():
            raise UserValueError(f"the query store {self.directory} is not a folder")
        if self.directory.is_symlink() and self.directory.parent.stat().st_mode & stat.S_IWOTH:
            raise UserValueError(
                f"the query store {self.directory} is a symbolic link in a folder that anyone can write, so "
                "anyone could have made it; give the folder it points to"
            )
        owner = self.directory.stat().st_uid
        if hasattr(os, "getuid") and owner != os.getuid():
            raise UserValueError(
                f"the query store {self.directory} belongs to another user (uid {owner}): uploaded images must not "
                "be kept where others can read or replace them; give a folder of your own"
            )
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise UserValueError(f"the query store {self.directory} is not writable")

    def put(self, query_id: str, data: bytes) -> None:
        """Store ``data`` under its content id ``query_id``; an image already stored is only marked as searched
        now, and one larger than the whole store is not stored. Raises OSError when the folder cannot be
        written."""
        path = self._path(query_id)
        if len(data) > self.max_bytes:
            return
        try:
            os.utime(path)  # the same image again: its age restarts
        except FileNotFoundError:
            atomic_write_bytes(path, data)
        with self._lock:
            self._written_since_sweep += len(data)
            due = self._written_since_sweep * 16 >= self.max_bytes
            if due:
                self._written_since_sweep = 0
        if due:
            self.sweep()

    def get(self, query_id: str) -> bytes | None:
        """The bytes stored under ``query_id``, or None when they are not there, are too old or do not match it."""
        path = self._path(query_id)
        try:
            if time.time() - path.stat().st_mtime > self.max_age_s:
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if query_id_of(data) != query_id:  # damaged, or written by something else: not this query's image
            log.warning("query store: %s does not hold the image of that id; removing it", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def sweep(self) -> None:
        """Remove the entries older than ``max_age_s``, then the oldest until at most ``max_bytes`` remain; also
        the temporary files of writes interrupted more than ``max_age_s`` ago."""
        now = time.time()
        entries = []  # (mtime, size, path)
        with os.scandir(self.directory) as scan:
            for entry in scan:
                try:
                    status = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed by another process meanwhile
                    continue
                if is_query_id(entry.name):
                    entries.append((status.st_mtime, status.st_size, Path(entry.path)))
                elif entry.name.startswith(".") and ".tmp-" in entry.name and now - status.st_mtime > self.max_age_s:
                    Path(entry.path).unlink(missing_ok=True)
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for mtime, size, path in entries:
            if total <= self.max_bytes and now - mtime <= self.max_age_s:
                break
            path.unlink(missing_ok=True)
            total -= size

    def _path(self, query_id: str) -> Path:
        if not is_query_id(query_id):  # never a path: only 64 hexadecimal digits name a file here
            raise ValueError(f"not a query id: {query_id[:80]!r}")
        return self.directory / query_id
