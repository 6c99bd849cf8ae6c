"""The folders a gallery's image files may be read from (its "image roots"), fixed when the gallery is indexed.

``sct index`` indexes only image files that lie inside the data root once
symlinks are resolved (``check_indexable``), and the manifest records the
resolved root (``image_roots``). The web app serves an item only when the file
it actually opened lies inside one of them (webapp.item_files), so neither an
edited items.csv nor a symlink changed after indexing makes it read another file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from catalog.folder import IMAGE_EXTENSIONS
from core.errors import UserValueError

_MAX_LISTED = 5


def is_inside(path: str, roots: Iterable[str]) -> bool:
    """Whether the absolute, resolved ``path`` is one of ``roots`` or lies below one (whole path components)."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def check_indexable(paths: Sequence[str], root: str | os.PathLike[str]) -> None:
    """Raise ValueError, naming up to five offenders and their count, unless every path has an image extension
    (catalog.folder.IMAGE_EXTENSIONS) and lies inside ``root`` with symlinks resolved."""
    root = os.path.realpath(root)
    refused = []
    for path in paths:
        extension = os.path.splitext(path)[1].lower()
        if extension not in IMAGE_EXTENSIONS:
            refused.append(f"{path} (extension {extension or 'none'!r} is not an image extension)")
        elif not is_inside(resolved := os.path.realpath(path), [root]):
            refused.append(f"{path} (resolves to {resolved}, outside {root})")
    if refused:
        listed = "; ".join(refused[:_MAX_LISTED]) + ("; ..." if len(refused) > _MAX_LISTED else "")
        raise UserValueError(
            f"refusing to index {len(refused):,} of {len(paths):,} listed file(s): only image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) inside the data root {root} are indexed, symlinks followed "
            f"(give the folder that really holds the images as the root): {listed}"
        )


def folder_of(paths: Iterable[str]) -> str:
    """The deepest folder holding every one of ``paths``, symlinks resolved: a gallery's default image root."""
    return os.path.commonpath([os.path.dirname(os.path.realpath(path)) for path in paths])
