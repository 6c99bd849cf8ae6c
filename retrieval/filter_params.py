"""A search's filter from its request parameters or command-line flags (``POST /api/search``, ``sct search``):
labels to keep, labels to leave out, lists of item ids and a half-open range of item ids.

Malformed values raise ``UserValueError`` naming the parameter as the caller spells it (``parameter 'ids'`` in
the API, ``--ids`` on the command line), then what retrieval.filters' parsers found wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from core.errors import UserValueError
from retrieval.filters import SearchFilter, parse_id_list, parse_id_range

T = TypeVar("T")


def build_filter(
    *,
    labels: Sequence[str] = (),
    exclude_labels: Sequence[str] = (),
    ids: Sequence[str] = (),
    id_range: str | None = None,
    names: dict[str, str],
) -> SearchFilter | None:
    """The filter of these parameter values (raw strings; each of ``ids`` comma-separated), or None when none is
    given. ``names`` spells the parameters ``ids`` and ``id_range`` in error messages."""
    if not (labels or exclude_labels or ids or id_range is not None):
        return None
    return SearchFilter(
        labels=frozenset(labels) if labels else None,
        exclude_labels=frozenset(exclude_labels),
        ids=np.unique(np.concatenate([_parsed(parse_id_list, raw, names["ids"]) for raw in ids])) if ids else None,
        id_range=_parsed(parse_id_range, id_range, names["id_range"]) if id_range is not None else None,
    )


def _parsed(parse: Callable[[str], T], raw: str, parameter: str) -> T:
    try:
        return parse(raw)
    except UserValueError as exc:
        raise UserValueError(f"{parameter}: {exc}") from None
