"""Whole-number request parameters (gallery item ids, rows, page numbers), checked with a 400 that names the
parameter and what it got."""

from __future__ import annotations

import re

from retrieval.gallery import Gallery
from webapp.errors import ApiError, quoted

_NUMBER = re.compile(r"[0-9]{1,18}")  # at most 18 digits: always an int64


def whole_number(parameter: str, raw: str | None, what: str) -> int:
    """``raw`` as an integer from 0; ApiError 400 ``parameter 'NAME' must be WHAT (an integer from 0), got ...``
    when it is missing or anything else (a sign, spaces, a fraction, more than 18 digits)."""
    if raw is None or not _NUMBER.fullmatch(raw):
        got = "nothing" if raw is None else quoted(raw)
        raise ApiError(400, f"parameter {parameter!r} must be {what} (an integer from 0), got {got}")
    return int(raw)


def item_id_param(parameter: str, raw: str | None) -> int:
    """A gallery item id (see ``whole_number``); whether the gallery has it is ``check_item``'s job."""
    return whole_number(parameter, raw, "a gallery item id")


def check_item(name: str, gallery: Gallery, item: int) -> None:
    """ApiError 404 unless gallery ``name`` has an item ``item``."""
    if not gallery.has_item(item):
        raise ApiError(404, f"no item {item} in gallery {name!r} ({len(gallery.items)} items)")
