"""Gallery image files as the server reads and sends them: only files inside the gallery's image roots, typed
by their content.

An item's path comes from items.csv, never from a request; but items.csv can be
edited, and an image folder can hold a symlink changed after indexing. So the
file is opened first, and the file actually opened must be a regular file
inside one of the manifest's ``image_roots`` (retrieval.image_roots). On Linux
that is the path the open descriptor links to in /proc/self/fd, so a symlink
swapped between a check and the open changes nothing; elsewhere the path is
resolved just before the open.

The response's type comes from the image decoded, never from the file name:
formats that every browser shows are sent as they are, any other image is
sent as PNG, and the headers keep a browser from running anything a file
holds besides its image (an HTML page hidden in a GIF, say).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import BinaryIO
from urllib.parse import quote

from flask import Response, request
from PIL import Image

import catalog
from retrieval.gallery import Gallery
from retrieval.image_roots import is_inside
from webapp.errors import ApiError
from webapp.params import check_item
from webapp.served import settings

log = logging.getLogger(__name__)

#: Pillow formats that every browser shows: sent as their own bytes. Other images are re-encoded as PNG.
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP"})
IMAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=300",  # short: a rebuilt gallery may give an id to another image
}
_FD_LINKS = "/proc/self/fd"
_HAS_FD_LINKS = os.path.isdir(_FD_LINKS)
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._-]")


class OutsideImageRoots(PermissionError):
    """The file opened is not a regular file inside the gallery's image roots."""


@dataclass(frozen=True)
class OpenItemFile:
    """A gallery item's image file, open on a descriptor checked by ``open_image_file``."""

    file: BinaryIO
    name: str  # the file's name in items.csv
    identity: tuple[int, int, int, int]  # device, inode, mtime (ns) and size of the file opened


def open_image_file(path: str, roots: Sequence[str]) -> BinaryIO:
    """Open ``path`` to read; raise OutsideImageRoots unless the file opened is a regular file inside ``roots``."""
    resolved = None if _HAS_FD_LINKS else os.path.realpath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the request
    try:
        opened = os.readlink(f"{_FD_LINKS}/{fd}") if resolved is None else resolved
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not is_inside(opened, roots):
            log.warning(
                "refused to serve %r: it opens %r, not a regular file inside the image roots %s", path, opened, roots
            )
            raise OutsideImageRoots(f"{path} is not a file inside the gallery's image folders")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def opened_item_file(name: str, gallery: Gallery, item_id: int) -> Iterator[OpenItemFile]:
    """The image file of item ``item_id`` of gallery ``name``, open for the ``with`` block; ApiError 404, with a
    message that names no path, when it cannot be opened or read there.

    A relative path in items.csv is relative to the working directory, as ``sct index`` wrote it.
    """
    check_item(name, gallery, item_id)
    path = os.path.abspath(gallery.item(item_id).path)  # from items.csv only, never from the request
    try:
        with open_image_file(path, gallery.manifest["image_roots"]) as file:
            status = os.fstat(file.fileno())
            yield OpenItemFile(
                file, PurePath(path).name, (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
            )
    except FileNotFoundError:
        raise ApiError(404, f"{_describe(name, item_id)} is missing") from None
    except OutsideImageRoots:
        raise ApiError(404, f"{_describe(name, item_id)} is not a file inside the gallery's image folders") from None
    except OSError as exc:
        raise ApiError(404, f"{_describe(name, item_id)} cannot be read ({exc.strerror})") from None
    except ValueError:  # a NUL character in the path
        raise ApiError(404, f"{_describe(name, item_id)} cannot be read (its path holds a NUL character)") from None


def item_image_response(name: str, gallery: Gallery, item_id: int) -> Response:
    """The image of item ``item_id`` as an inline response typed by its decoded format (see the module)."""
    with opened_item_file(name, gallery, item_id) as item:
        data = item.file.read()
    image_format = _browser_format(data)
    if image_format is None:
        try:
            data, image_format = settings().compute.run(as_png, data, settings().max_pixels), "PNG"
        except catalog.ImageLoadError as exc:
            raise ApiError(404, f"{_describe(name, item_id)} cannot be read: {exc.reason}") from None
    response = Response(data, mimetype=Image.MIME[image_format])
    response.headers.update(IMAGE_HEADERS)
    response.headers["Content-Disposition"] = content_disposition(item.name, image_format)
    response.add_etag()
    return response.make_conditional(request)


def as_png(data: bytes, max_pixels: int) -> bytes:
    """An image file's bytes decoded (upright, RGB) and encoded as PNG; runs in a compute slot."""
    buffer = io.BytesIO()
    catalog.decode_rgb(data, max_pixels=max_pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def content_disposition(file_name: str, image_format: str) -> str:
    """``inline`` with the file's name, its extension that of the format sent (so a saved copy of a GIF named
    x.html is x.gif): ``filename`` in ASCII letters, digits and ``._-`` only, ``filename*`` percent-encoded
    UTF-8, so no character of the name (newline, quote, semicolon) can end the header or its value early."""
    stem = PurePath(file_name).stem
    extension = f".{image_format.lower()}"
    return (
        f"inline; filename=\"{_NOT_TOKEN.sub('_', stem)}{extension}\"; "
        f"filename*=UTF-8''{quote(stem, safe='', errors='replace')}{extension}"
    )


def _browser_format(data: bytes) -> str | None:
    """The Pillow format of ``data`` when it is one of BROWSER_FORMATS (from the header only), else None."""
    try:
        with Image.open(io.BytesIO(data), formats=sorted(BROWSER_FORMATS)) as image:
            return image.format if image.format in BROWSER_FORMATS else None
    except Exception:  # not one of them, or a broken header (plugins raise many types): the full decode tells
        return None


def _describe(name: str, item_id: int) -> str:
    return f"the image file of item {item_id} in gallery {name!r}"
