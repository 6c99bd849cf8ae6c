"""Images of a plain folder, for ``sct index --images`` and ``sct eval --queries-images``."""

from __future__ import annotations

import os
from pathlib import Path

from catalog.folder import IMAGE_EXTENSIONS, read_folder
from core.errors import UserFileNotFoundError, UserValueError


def list_image_folder(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(absolute path, label) of every image under ``directory``, sorted.

    With subfolders, each is a class and its images (at any depth) get its
    name as label, the layout of catalog's folder datasets. Without
    subfolders the images directly inside get the empty label.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise UserFileNotFoundError(f"image folder not found: {directory}")
    entries = [entry for entry in directory.iterdir() if not entry.name.startswith(".")]
    if any(entry.is_dir() for entry in entries):
        return [(record.path, record.label) for record in read_folder(directory)]
    images = sorted(entry for entry in entries if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UserValueError(f"no images in {directory} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [(str(path), "") for path in images]
