"""Atomic writes: a reader sees the old file or folder, or the new one, never half of one.

Everything is written under a temporary name next to its destination (same
file system, so the final rename is atomic), fsynced, then renamed into place.
A crash leaves the previous version intact plus, at worst, a hidden
``.<name>.tmp-*`` leftover.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new contents to; on success it replaces ``path``.

    For writers that want a file name rather than bytes (``faiss.write_index``,
    ``torch.save``). On an exception the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path) as temporary:
        with open(temporary, "xb") as file:
            file.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_directory(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it replaces ``final_dir``.

    On success every file is fsynced, the old folder (if any) is renamed away,
    the new one renamed into place, and the old one deleted. Between the two
    renames ``final_dir`` is briefly absent, but never partial. On an exception
    the temporary folder is removed and ``final_dir`` is untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(final_dir)
    temporary.mkdir()
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        _fsync_directory(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex}") if final_dir.exists() else None
    if previous is not None:
        os.rename(final_dir, previous)
    try:
        os.rename(temporary, final_dir)
    except BaseException:
        if previous is not None:
            os.rename(previous, final_dir)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(final_dir.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_directory(path: Path) -> None:
    """Make a rename durable; not every platform can open a folder, so failures are ignored."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
