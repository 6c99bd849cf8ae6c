"""Change a gallery in place: add items (``sct index --add``) or remove them (``--remove``), without embedding
again or rebuilding what stays.

The vectors already in the index stay where they are: a flat or HNSW index is put inside a FAISS
``IndexIDMap2`` on its first change, so that it numbers its vectors by item id; an IVF index keeps ids in its
lists and reads them back through a hash-table direct map. Added vectors go in with ``add_with_ids`` (an IVF
index with the coarse quantiser it was trained with; HNSW links them into its graph). Removed ones leave with
``remove_ids``, except from HNSW, which cannot remove: their ids are listed in REMOVED_FILE and every search
skips them. Item ids are never reused (the manifest's ``next_id``), so the ids a user or a URL holds keep
naming the same images. The manifest's ``history`` records each change.

Each change writes a new version of the folder and swaps it in atomically, as a build does (a served gallery
reloads it live), under a lock that serialises concurrent changes of one gallery. The evaluation files of the
previous version (eval.json, eval_queries.npz) describe items that changed, so they are not carried over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from core.atomic import atomic_directory, atomic_file
from core.errors import UserValueError
from retrieval.gallery import (
    FORMAT_VERSION,
    INDEX_FILE,
    MODEL_FILE,
    REMOVED_FILE,
    Gallery,
    base_index,
    check_embeddings,
    recall_vs_exact_of,
    write_index,
    write_manifest,
)
from retrieval.items import ITEMS_FILE, GalleryItem, ItemTable, write_items

#: Ids listed in a history entry of a removal; longer lists keep their count and the first ones.
_HISTORY_IDS = 100


def add_items(
    directory: str | os.PathLike[str],
    embeddings: np.ndarray,
    sources: Sequence[tuple[str, str, str | None]],
    *,
    image_root: str,
    note: str,
) -> list[int]:
    """Append ``sources`` (path, label, chain), embedded as ``embeddings`` [n, d] by the gallery's own model, to
    the gallery in ``directory``; returns their new ids. ``image_root`` joins the folders the server reads item
    images from; ``note`` says in the history where they came from."""
    with _changing(directory) as gallery:
        _check_changeable(gallery)
        first = int(gallery.manifest.get("next_id", len(gallery.items)))
        new_ids = np.arange(first, first + len(sources), dtype=np.int64)
        new_items = [GalleryItem(int(i), *source) for i, source in zip(new_ids, sources)]
        check_embeddings(embeddings, [GalleryItem(row, *source) for row, source in enumerate(sources)])
        if embeddings.shape[1] != gallery.index.d:
            raise UserValueError(
                f"the new vectors have {embeddings.shape[1]} dimensions, the gallery {gallery.index.d}"
            )
        index = _with_own_ids(gallery)
        index.add_with_ids(np.ascontiguousarray(embeddings, dtype=np.float32), new_ids)
        items = ItemTable.from_items([*gallery.items, *new_items])
        roots = sorted({*gallery.manifest["image_roots"], os.path.realpath(image_root)})
        change = {"change": "add", "added": len(new_items), "id_range": [first, int(new_ids[-1]) + 1], "source": note}
        _write_version(gallery, index, items, gallery.removed, change, next_id=int(new_ids[-1]) + 1, roots=roots)
        return new_ids.tolist()


def remove_items(directory: str | os.PathLike[str], item_ids: Sequence[int]) -> int:
    """Remove the items ``item_ids`` from the gallery in ``directory``; returns how many there were. Every id
    must be an item of the gallery, and at least one item must stay."""
    with _changing(directory) as gallery:
        _check_changeable(gallery)
        ids = np.unique(np.asarray(item_ids, dtype=np.int64))
        missing = ids[gallery.items.rows_of(ids) < 0]
        if missing.size:
            listed = ", ".join(map(str, missing[:10].tolist())) + (", ..." if missing.size > 10 else "")
            raise UserValueError(
                f"gallery {gallery.name} has no item {listed} ({missing.size} of the {ids.size} ids to remove); "
                "nothing was removed"
            )
        if ids.size == len(gallery.items):
            raise UserValueError(
                f"removing all {ids.size} items would leave gallery {gallery.name} empty; build a new one"
            )
        index = _with_own_ids(gallery)
        removed = gallery.removed
        if _can_remove(index):
            dropped = index.remove_ids(faiss.IDSelectorArray(ids))  # what a hash-table direct map takes
            if dropped != ids.size:
                raise RuntimeError(f"FAISS removed {dropped} of {ids.size} vectors")
        else:
            removed = np.union1d(removed, ids)
        keep = np.ones(len(gallery.items), dtype=bool)
        keep[gallery.items.rows_of(ids)] = False
        items = ItemTable.from_items(item for item, kept in zip(gallery.items, keep) if kept)
        listed = ids[:_HISTORY_IDS].tolist()
        change = {"change": "remove", "removed": int(ids.size), "ids": listed, "ids_listed": len(listed)}
        _write_version(
            gallery, index, items, removed, change, next_id=int(gallery.manifest.get("next_id", len(gallery.items)))
        )
        return int(ids.size)


@contextlib.contextmanager
def _changing(directory: str | os.PathLike[str]) -> Iterator[Gallery]:
    """The gallery, loaded under an exclusive lock of its folder that other changes wait for."""
    directory = Path(directory)
    lock_path = directory.with_name(f".{directory.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield Gallery.load(directory, providers=["CPUExecutionProvider"])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_changeable(gallery: Gallery) -> None:
    if gallery.manifest.get("storage") == "ondisk":
        raise UserValueError(
            f"gallery {gallery.name} keeps its IVF lists on disk ({gallery.manifest.get('ivfdata_file')}), "
            "which --add and --remove cannot change in place; rebuild it with `sct index`"
        )


def _with_own_ids(gallery: Gallery) -> faiss.Index:
    """The gallery's index, able to add vectors under given ids and to read them back by id: an IVF index with
    a hash-table direct map; a flat or HNSW index inside an IndexIDMap2 (mapping ids 0..N-1 when first put
    there, which is what it held)."""
    index = faiss.downcast_index(gallery.index)
    if isinstance(index, faiss.IndexIDMap2):
        return index
    if (ivf := faiss.try_extract_index_ivf(index)) is not None:
        if ivf.direct_map.type != faiss.DirectMap.Hashtable:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    # IndexIDMap2 takes only an empty index: give it one, then the real one with the ids it holds.
    mapped = faiss.IndexIDMap2(faiss.IndexFlatIP(index.d))
    mapped.index = index
    mapped.referenced_objects = [index]  # keeps the Python object (and so the index) alive with the map
    mapped.ntotal = index.ntotal
    faiss.copy_array_to_vector(np.arange(index.ntotal, dtype=np.int64), mapped.id_map)
    mapped.construct_rev_map()
    return mapped


def _can_remove(index: faiss.Index) -> bool:
    """HNSW cannot remove vectors (FAISS raises); flat and IVF can."""
    return not isinstance(base_index(index), faiss.IndexHNSW)


def _write_version(
    gallery: Gallery,
    index: faiss.Index,
    items: ItemTable,
    removed: np.ndarray,
    change: dict[str, Any],
    *,
    next_id: int,
    roots: Sequence[str] | None = None,
) -> None:
    """Write the changed gallery as a new version of its folder, check it loads, and swap it in."""
    manifest = dict(gallery.manifest)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    history = manifest.get("history") or [{"change": "build", "at": manifest["created"], "count": manifest["count"]}]
    manifest.update(
        format_version=FORMAT_VERSION,
        count=len(items),
        next_id=next_id,
        removed_in_index=len(removed),
        history=[*history, {**change, "at": at, "count": len(items)}],
        **({"image_roots": list(roots)} if roots is not None else {}),
    )
    manifest.pop("recall_at_10_vs_exact", None)
    with atomic_directory(gallery.directory) as staging:
        shutil.copyfile(gallery.model_path, staging / MODEL_FILE)
        write_items(staging / ITEMS_FILE, items)
        with atomic_file(staging / INDEX_FILE) as index_path:
            write_index(index, index_path)
        if len(removed):
            np.save(staging / REMOVED_FILE, removed.astype(np.int64), allow_pickle=False)
        if manifest["index_type"] != "flat":
            write_manifest(staging, manifest)
            manifest["recall_at_10_vs_exact"] = recall_vs_exact_of(Gallery.load(staging))
        write_manifest(staging, manifest)
        Gallery.load(staging)  # never publish a folder that would not load
