"""A gallery folder: FAISS index + items + the model that embedded them (docs/ARCHITECTURE.md).

``build_gallery`` writes the folder atomically and checks it loads before
publishing it; ``Gallery.load`` refuses a folder whose parts disagree, naming
what disagrees, so metadata can never silently drift from the index. With
``storage="ondisk"`` an IVF index keeps its inverted lists in a memory-mapped
file of the folder (retrieval.index_files), for galleries bigger than RAM.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from core.atomic import atomic_directory, atomic_file
from core.errors import UserFileNotFoundError, UserValueError
from retrieval import probe
from retrieval.embedder import OnnxEmbedder, file_sha256
from retrieval.filters import SearchFilter, allowed_ids
from retrieval.image_roots import folder_of
from retrieval.index_files import (
    IVFDATA_FILE,
    build_ondisk_ivf,
    gather_rows,
    log_stage,
    ondisk_lists,
    read_ondisk_index,
    row_chunks,
)
from retrieval.items import (  # noqa: F401 (re-exported)
    ITEMS_FILE,
    GalleryItem,
    GalleryMismatchError,
    ItemTable,
    read_items,
    write_items,
)

#: 2: image_roots and probe_embedding in the manifest (and image_roots in shard.json). 3: ids that outlive
#: removals (``sct index --add/--remove``), the manifest's next_id and history, and REMOVED_FILE.
FORMAT_VERSION = 3
READ_FORMATS = (2, 3)
MANIFEST_FILE = "manifest.json"
#: The ids removed from an index type that cannot remove vectors (HNSW): searches skip them (int64 .npy).
REMOVED_FILE = "removed_ids.npy"
INDEX_FILE = "index.faiss"
MODEL_FILE = "model.onnx"
EVAL_FILE = "eval.json"
INDEX_TYPES = ("flat", "ivf-flat", "ivf-pq", "hnsw")
#: Where an index keeps its vectors: in index.faiss (loaded into RAM), or, for the IVF types, in IVFDATA_FILE
#: (memory-mapped).
STORAGES = ("memory", "ondisk")
_IVF_TYPES = ("ivf-flat", "ivf-pq")
_MANIFEST_KEYS = ("model_sha256", "embedding_dim", "count", "faiss_factory", "metric", "image_roots", "probe_embedding")
_HNSW_NEIGHBORS = 32
_HNSW_EF_SEARCH = 128
#: k-means training points per IVF list: all of them up to 256 (FAISS's own cap) in memory; on disk a
#: sample of 64 (FAISS asks for at least 39), which bounds the memory and time of training at any size.
_TRAIN_POINTS_PER_LIST = 256
_ONDISK_TRAIN_POINTS_PER_LIST = 64
_RECALL_QUERIES = 1000
_RECALL_K = 10
#: A filtered search of an IVF or HNSW index that allows at most this many items ranks their stored vectors
#: exactly; one that allows more searches the index with a FAISS IDSelector, approximately like the unfiltered
#: search (and may then find fewer than k). A flat index always searches with the IDSelector: exact.
#: The selector is a bitmap over the ids (IDSelectorBitmap).
EXACT_FILTER_MAX = 4096


def build_gallery(
    out_dir: str | os.PathLike[str],
    embeddings: np.ndarray | Sequence[np.ndarray],
    items: Sequence[GalleryItem],
    model_path: str | os.PathLike[str],
    *,
    dataset: str,
    split: str,
    index_type: str = "flat",
    storage: str = "memory",
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    image_roots: Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a gallery folder atomically and return its path.

    ``embeddings`` are the unit vectors of ``items`` (row i is the item with
    id i): one array [N, d], or consecutive blocks of rows (the shards of
    retrieval.shards, memory-mapped). With ``storage="ondisk"`` (IVF types
    only) the blocks are read a part at a time and never stacked, so they may
    exceed RAM. Non-flat indexes record their Recall@10 against exact search in
    the manifest (``recall_at_10_vs_exact``). ``nlist``/``nprobe`` tune the IVF
    types; by default nlist ≈ 4·√N and nprobe = nlist / 8. ``image_roots`` are
    the folders the items' image files lie in, the only ones a server reads
    them from (retrieval.image_roots); by default the one folder holding all of
    them. The manifest also keeps the model's embedding of the probe image
    (retrieval.probe), by which ``Gallery.load`` recognises the model.
    """
    blocks = check_embeddings(embeddings, items)
    count, dim = len(items), blocks[0].shape[1]
    factory, nlist, nprobe = _plan_index(index_type, storage, count, dim, nlist=nlist, nprobe=nprobe)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_sha256": file_sha256(model_path),
        "embedding_dim": dim,
        "count": count,
        "faiss_factory": factory,
        "index_type": index_type,
        "storage": storage,
        **({"ivfdata_file": IVFDATA_FILE} if storage == "ondisk" else {}),
        "metric": "inner_product",
        "dataset": dataset,
        "split": split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "next_id": count,
        "image_roots": sorted(
            {os.path.realpath(root) for root in image_roots}
            if image_roots is not None
            else {folder_of(item.path for item in items)}
        ),
        "probe_embedding": _probe_embedding(model_path),
    }
    index = None if storage == "ondisk" else _make_index(_stack(blocks), factory, nlist, nprobe, seed=seed)
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir) as staging:
            shutil.copyfile(model_path, staging / MODEL_FILE)
            write_items(staging / ITEMS_FILE, items)
            if index is None:  # on disk: built inside the folder, next to index.faiss
                index = _make_ondisk_index(blocks, staging, factory, nlist, nprobe, seed=seed)
            if index_type != "flat":
                manifest["recall_at_10_vs_exact"] = _recall_vs_exact(index, blocks, seed=seed)
            with atomic_file(staging / INDEX_FILE) as index_path:
                write_index(index, index_path)
            del index  # before Gallery.load reads it back: never two copies in memory
            manifest["history"] = [{"change": "build", "at": manifest["created"], "count": count}]
            write_manifest(staging, manifest)
            Gallery.load(staging)  # never publish a folder that would not load
    except OSError as exc:  # a full disk, most likely: say which gallery, and that the old one is intact
        reason = exc.strerror or str(exc)
        raise OSError(
            exc.errno,
            f"cannot write gallery {out_dir} (any previous version is unchanged): {reason}"
            + (f": {exc.filename}" if exc.filename else ""),
        ) from exc
    return out_dir


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_index(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index`` through a Python file, so that a failed write (a full disk) raises OSError.

    Given a file name, FAISS writes through stdio and ignores a failed close:
    on a full disk an index smaller than stdio's buffer was cut short without
    an error, and a larger one failed with a RuntimeError. Python's file
    raises OSError(ENOSPC) in both cases, from a write or from the final flush.
    """
    with open(path, "wb") as file:
        faiss.write_index(index, faiss.PyCallbackIOWriter(file.write))


class Gallery:
    """A loaded, verified gallery folder; use ``Gallery.load``."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        items: Sequence[GalleryItem],
        index: faiss.Index,
        embedder: OnnxEmbedder,
        removed: np.ndarray | None = None,
    ) -> None:
        self.directory = directory
        self.name = directory.name
        self.manifest = manifest
        self.items = items if isinstance(items, ItemTable) else ItemTable.from_items(items)
        self.model_path = directory / MODEL_FILE
        self.index = index
        self.embedder = embedder
        #: ids still in ``index`` but removed from the gallery (REMOVED_FILE), which every search skips
        self.removed = np.zeros(0, dtype=np.int64) if removed is None else removed
        self._skip_removed = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.removed)) if len(self.removed) else None
        self._search_index = _on_gpu_if_available(index)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every item's label (numpy str array), made on first use: evaluation needs it, searching does not."""
        return self.items.label_array()

    @functools.cached_property
    def chains(self) -> np.ndarray | None:
        """Every item's chain, or None unless every item has one."""
        return self.items.chain_array()

    @classmethod
    def load(cls, directory: str | os.PathLike[str], providers: Sequence[str] | None = None) -> Gallery:
        """Load and cross-check manifest, index, items and model; raise GalleryMismatchError on disagreement."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserFileNotFoundError(f"gallery folder not found: {directory}")
        for file in (MANIFEST_FILE, INDEX_FILE, ITEMS_FILE, MODEL_FILE):
            if not (directory / file).is_file():
                raise UserFileNotFoundError(f"gallery {directory} lacks {file}")
        manifest = read_manifest(directory)
        items = read_items(directory / ITEMS_FILE)
        index = _read_index(directory, manifest)
        removed = _read_removed(directory, manifest)
        live = index.ntotal - len(removed)
        held = f"{INDEX_FILE} ntotal" + (f" less the {len(removed)} ids of {REMOVED_FILE}" if len(removed) else "")
        counts = [(f"{MANIFEST_FILE} count", manifest["count"]), (held, live)]
        if lists := ondisk_lists(index):
            counts.append((f"{manifest['ivfdata_file']} vectors", lists.compute_ntotal()))
        _check_agree("count", *counts, (f"{ITEMS_FILE} rows", len(items)))
        if items.ids.size and items.ids[-1] >= manifest.get("next_id", len(items)):
            raise GalleryMismatchError(
                f"{ITEMS_FILE} has id {items.ids[-1]}, at or above {MANIFEST_FILE} next_id {manifest.get('next_id')}"
            )
        manifest_dim = (f"{MANIFEST_FILE} embedding_dim", manifest["embedding_dim"])
        _check_agree("embedding dimension", manifest_dim, (f"{INDEX_FILE} d", index.d))
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise GalleryMismatchError(f"{INDEX_FILE} metric is {index.metric_type}, expected inner product")
        _check_agree(
            "model sha256",
            (f"{MANIFEST_FILE} model_sha256", manifest["model_sha256"]),
            (f"sha256 of {MODEL_FILE}", file_sha256(directory / MODEL_FILE)),
        )
        _check_ids(index, items, removed)
        embedder = OnnxEmbedder(directory / MODEL_FILE, providers=providers)
        probe_embedding, probe_map = _probe_outputs(embedder)
        _check_agree(
            "embedding dimension",
            manifest_dim,
            (f"{MODEL_FILE} embedding dim", embedder.dim),
            (f"{MODEL_FILE} embedding output width", len(probe_embedding)),
            (f"{MODEL_FILE} feature_map output width", probe_map.shape[-1]),
            (f"{MANIFEST_FILE} probe_embedding length", len(manifest["probe_embedding"])),
        )
        _check_probe(manifest["probe_embedding"], probe_embedding)
        return cls(directory, manifest, items, index, embedder, removed)

    def has_item(self, item_id: int) -> bool:
        """Whether the gallery holds an item with id ``item_id``."""
        return self.items.row_of(item_id) is not None

    def item(self, item_id: int) -> GalleryItem:
        """The item with id ``item_id`` (KeyError when there is none; ``has_item`` asks first)."""
        row = self.items.row_of(item_id)
        if row is None:
            raise KeyError(f"no item {item_id} in gallery {self.name!r}")
        return self.items[row]

    def search(self, queries: np.ndarray, k: int, filter: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner-product neighbours among the items ``filter`` allows (all by default): scores [M, k'] and
        item ids [M, k'] (int64), k' = min(k, items allowed). Approximate indexes pad with id −1 where they find
        fewer. Up to EXACT_FILTER_MAX allowed items are ranked exactly over their stored vectors."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must have shape [M, {self.index.d}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if filter is None or filter.empty:
            if self._skip_removed is None:
                scores, ids = self._search_index.search(queries, min(k, self.index.ntotal))
                return scores, ids.astype(np.int64, copy=False)
            return self._search_selected(queries, min(k, len(self.items)), self._skip_removed)
        allowed = allowed_ids(self.items, filter)
        k = min(k, len(allowed))
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        if len(allowed) <= EXACT_FILTER_MAX and not self._exact:
            return self._search_exactly(queries, k, allowed)
        # A bitmap over the ids: one bit test per candidate (IDSelectorBatch's hash set costs far more per test
        # when many are allowed). Allowed holds no removed id: they are not items.
        bitmap = np.zeros(int(allowed[-1]) + 1, dtype=bool)
        bitmap[allowed] = True
        bits = np.packbits(bitmap, bitorder="little")
        return self._search_selected(queries, k, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)))  # n: bytes

    def _search_selected(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's own search (on the CPU), skipping the ids ``selector`` rejects."""
        scores, ids = self.index.search(queries, k, params=_search_parameters(self.index, selector))
        return scores, ids.astype(np.int64, copy=False)

    def _search_exactly(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rank the stored vectors of the ``allowed`` ids by inner product, a block of ids at a time."""
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        vectors = self.vectors()
        for start in range(0, len(allowed), 4096):
            block = allowed[start : start + 4096]
            scores = queries @ vectors.by_id(block).T
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(block) else np.indices(scores.shape)[1]
            heap.add_result(np.take_along_axis(scores, top, axis=1), block[top])
        heap.finalize()
        return heap.D.astype(np.float32, copy=False), heap.I.astype(np.int64, copy=False)

    @functools.cached_property
    def _exact(self) -> bool:
        """Whether the index is flat: its own search, filtered by an IDSelector, is exact."""
        return isinstance(base_index(self.index), faiss.IndexFlat)

    def vectors_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The stored vectors [n, d] of ``item_ids`` (for IVF-PQ: their quantised reconstructions); KeyError
        naming an id the gallery does not hold."""
        item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)
        missing = item_ids[self.items.rows_of(item_ids) < 0]
        if missing.size:
            raise KeyError(f"no item {int(missing[0])} in gallery {self.name!r}")
        return self.vectors().by_id(item_ids)

    def embeddings(self) -> np.ndarray:
        """The stored vectors [N, d] in row order, all in memory (for IVF-PQ: their quantised reconstructions)."""
        return self.vectors()[:]

    @functools.cached_property
    def _vectors(self) -> StoredVectors:
        return StoredVectors(self.index, None if self.items.dense else self.items.ids)

    def vectors(self) -> StoredVectors:
        """The stored vectors in row order (row i: item ``items[i]``), read from the index only as sliced: what
        evaluation streams."""
        return self._vectors


class StoredVectors:
    """A gallery's vectors [N, d] in row order, read as sliced: ``vectors[a:b]`` or ``vectors[rows]`` (numpy
    float32). ``retrieval.metrics.evaluate`` reads a gallery this way a block at a time, so galleries whose
    vectors do not fit in RAM (an on-disk IVF index) can be evaluated. ``ids`` are the item id of each row;
    None when they are the rows themselves (nothing was ever removed)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, index: faiss.Index, ids: np.ndarray | None = None) -> None:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            # id → (list, offset), so vectors can be read by id: an array while the ids are 0..N-1, a hash table
            # once removals left gaps
            if ids is None:
                ivf.make_direct_map()
            else:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.index = index
        self.ids = ids
        self.shape = (int(index.ntotal) if ids is None else len(ids), int(index.d))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("StoredVectors slices must be contiguous")
            if self.ids is None:
                return self.index.reconstruct_n(start, max(stop - start, 0))
            return self.by_id(self.ids[start:stop])
        rows = np.ascontiguousarray(key, dtype=np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(self))):
            raise IndexError(f"rows must be a 1-d array within 0..{len(self) - 1}")
        return self.by_id(rows if self.ids is None else self.ids[rows])

    def by_id(self, item_ids: np.ndarray) -> np.ndarray:
        """The vectors of ``item_ids`` (ids the index holds)."""
        if not len(item_ids):
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        return self.index.reconstruct_batch(np.ascontiguousarray(item_ids, dtype=np.int64))


def _read_index(directory: Path, manifest: dict[str, Any]) -> faiss.Index:
    """index.faiss, with its inverted lists memory-mapped from the gallery folder when they are on disk."""
    path = directory / INDEX_FILE
    ondisk = manifest.get("storage") == "ondisk"
    if ondisk:
        name = manifest.get("ivfdata_file")
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise GalleryMismatchError(
                f"{MANIFEST_FILE} ivfdata_file must name a file of the gallery folder, " f"got {name!r}"
            )
        if not (directory / name).is_file():
            raise UserFileNotFoundError(f"gallery {directory} lacks {name} (the inverted lists of its on-disk index)")
    try:
        index = read_ondisk_index(path, name) if ondisk else faiss.read_index(str(path))
    except RuntimeError as exc:  # FAISS reports unreadable files this way
        raise GalleryMismatchError(f"{path} is not a readable FAISS index: {exc}") from None
    except ValueError as exc:
        raise GalleryMismatchError(f"{INDEX_FILE} and {MANIFEST_FILE} storage ondisk disagree: {exc}") from None
    if not ondisk and ondisk_lists(index) is not None:
        raise GalleryMismatchError(
            f"{INDEX_FILE} keeps its inverted lists in another file, but {MANIFEST_FILE} " f"storage is not ondisk"
        )
    return index


def _read_removed(directory: Path, manifest: dict[str, Any]) -> np.ndarray:
    """The sorted ids of REMOVED_FILE (none when the folder has no such file); checked against the manifest."""
    path = directory / REMOVED_FILE
    expected = int(manifest.get("removed_in_index", 0))
    if not path.is_file():
        if expected:
            raise UserFileNotFoundError(f"gallery {directory} lacks {REMOVED_FILE} ({expected} removed ids)")
        return np.zeros(0, dtype=np.int64)
    try:
        removed = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise GalleryMismatchError(f"{REMOVED_FILE} is not a readable .npy array: {exc}") from None
    if removed.dtype != np.int64 or removed.ndim != 1 or (len(removed) > 1 and not (np.diff(removed) > 0).all()):
        raise GalleryMismatchError(f"{REMOVED_FILE} must hold ascending int64 ids")
    _check_agree(
        "removed ids", (f"{MANIFEST_FILE} removed_in_index", expected), (f"{REMOVED_FILE} length", len(removed))
    )
    return removed


def _check_ids(index: faiss.Index, items: ItemTable, removed: np.ndarray) -> None:
    """The index must hold the items' ids (and the removed ones it cannot drop): an index that maps its own ids
    (IndexIDMap2) maps exactly those; one that does not (a new flat or HNSW index) holds ids 0..N-1."""
    held = np.union1d(items.ids, removed) if len(removed) else items.ids
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2):
        mapped = np.sort(faiss.vector_to_array(index.id_map))
        if not np.array_equal(mapped, held):
            raise GalleryMismatchError(f"{INDEX_FILE} maps other ids than the items of {ITEMS_FILE} hold")
    elif isinstance(index, faiss.IndexIDMap):
        raise GalleryMismatchError(f"{INDEX_FILE} is an IndexIDMap, which cannot read vectors back by id")
    elif faiss.try_extract_index_ivf(index) is None and not (len(held) == 0 or held[-1] == len(held) - 1):
        raise GalleryMismatchError(f"{INDEX_FILE} numbers its vectors 0..N-1 but {ITEMS_FILE} has other ids")


def base_index(index: faiss.Index) -> faiss.Index:
    """The index that holds the vectors: the one inside an IndexIDMap2 (a gallery changed by --add or --remove),
    else ``index`` itself; downcast to its own type."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying ``selector`` and the index's own nprobe or efSearch."""
    base = base_index(index)
    if (ivf := faiss.try_extract_index_ivf(base)) is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=base.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def _probe_outputs(embedder: OnnxEmbedder) -> tuple[np.ndarray, np.ndarray]:
    """The model's embedding [d] and feature map [Z, d] of the probe image (retrieval.probe).

    Their widths are checked against the manifest: the metadata's embedding_dim
    is cross-checked with the graph's output shape only when that shape is
    static, and a model with a symbolic width that outputs another size would
    pass, then fail every search.
    """
    try:
        embeddings, maps = embedder.embed_pixels_with_maps(probe.probe_pixels(embedder.preprocessing))
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        size = embedder.preprocessing.image_size
        raise GalleryMismatchError(f"{embedder.model_path.name} fails on a {size}×{size} input: {exc}") from None
    return embeddings[0], maps[0]


def _probe_embedding(model_path: str | os.PathLike[str]) -> list[float]:
    """The model's embedding of the probe image, on the CPU (the reference any provider is compared with)."""
    embedding, _ = _probe_outputs(OnnxEmbedder(model_path, providers=["CPUExecutionProvider"]))
    return [round(value, 6) for value in embedding.tolist()]


def _check_probe(stored: list[float], embedding: np.ndarray) -> None:
    """Refuse a model.onnx that embeds the probe image otherwise than the model the gallery was built with:
    one swapped in with its sha256 edited into the manifest to match."""
    stored_vector, embedding = np.asarray(stored, dtype=np.float64), embedding.astype(np.float64)
    cosine = float(stored_vector @ embedding / (np.linalg.norm(stored_vector) * np.linalg.norm(embedding)))
    if not cosine >= probe.MIN_COSINE:  # NaN included
        raise GalleryMismatchError(
            f"{MODEL_FILE} is not the model that built this gallery: the cosine between its embedding of the probe "
            f"image and {MANIFEST_FILE} probe_embedding is {cosine:.4f}, at least {probe.MIN_COSINE} expected "
            f"(rebuild the gallery with `sct index` if the model was replaced on purpose)"
        )


def check_embeddings(embeddings: np.ndarray | Sequence[np.ndarray], items: Sequence[GalleryItem]) -> list[np.ndarray]:
    """The embeddings as a list of row blocks [n_i, d], checked a chunk at a time (blocks may be memory-mapped)."""
    blocks = [embeddings] if isinstance(embeddings, np.ndarray) else list(embeddings)
    shapes = [list(np.shape(block)) for block in blocks]
    if not blocks or any(len(shape) != 2 or shape[1] != shapes[0][1] for shape in shapes):
        raise ValueError(f"embeddings must have shape [N, d] with N > 0, got blocks of shapes {shapes}")
    count = sum(shape[0] for shape in shapes)
    if count == 0:
        raise ValueError(f"embeddings must have shape [N, d] with N > 0, got {[0, shapes[0][1]]}")
    if len(items) != count:
        raise ValueError(f"{len(items)} items for {count} embeddings")
    wrong = next((row for row, item in enumerate(items) if item.id != row), None)
    if wrong is not None:
        raise ValueError(f"item ids must be their row numbers 0..N-1; row {wrong} has id {items[wrong].id}")
    offset = 0
    for chunk in row_chunks(blocks):
        norms = np.linalg.norm(chunk, axis=1)
        not_unit = np.flatnonzero(~(np.abs(norms - 1) < 1e-2))  # NaN norms included
        if not_unit.size:
            row = not_unit[0]
            raise ValueError(f"embeddings must be unit vectors; row {offset + row} has norm {norms[row]:.4g}")
        offset += len(chunk)
    return [block for block in blocks if len(block)]


def _stack(blocks: Sequence[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(blocks[0] if len(blocks) == 1 else np.concatenate(blocks), dtype=np.float32)


def check_index_options(
    index_type: str, nlist: int | None = None, nprobe: int | None = None, storage: str = "memory"
) -> None:
    """Reject an unknown index type or storage, or IVF options given for another type, before any work is done."""
    if index_type not in INDEX_TYPES:
        raise UserValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if index_type not in _IVF_TYPES and (nlist is not None or nprobe is not None):
        raise UserValueError(f"nlist and nprobe apply to the ivf index types, not {index_type!r}")
    if storage not in STORAGES:
        raise UserValueError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    if storage == "ondisk" and index_type not in _IVF_TYPES:
        raise UserValueError(f"storage ondisk needs an ivf index type ({', '.join(_IVF_TYPES)}), not {index_type!r}")


def _plan_index(
    index_type: str, storage: str, count: int, dim: int, *, nlist: int | None, nprobe: int | None
) -> tuple[str, int | None, int | None]:
    """The FAISS factory string, nlist and nprobe (None for non-IVF types), checked against the item count."""
    check_index_options(index_type, nlist, nprobe, storage)
    if index_type == "flat":
        return "Flat", None, None
    if index_type == "hnsw":
        return f"HNSW{_HNSW_NEIGHBORS}", None, None
    nlist = _default_nlist(count) if nlist is None else nlist
    nprobe = max(1, nlist // 8) if nprobe is None else nprobe
    if not 1 <= nlist <= count:
        raise UserValueError(f"nlist must be between 1 and the item count {count}, got {nlist}")
    if not 1 <= nprobe <= nlist:
        raise UserValueError(f"nprobe must be between 1 and nlist {nlist}, got {nprobe}")
    factory = f"IVF{nlist},Flat" if index_type == "ivf-flat" else f"IVF{nlist},PQ{_pq_parts(dim)}x{_pq_bits(count)}"
    return factory, nlist, nprobe


def _make_index(
    embeddings: np.ndarray, factory: str, nlist: int | None, nprobe: int | None, *, seed: int
) -> faiss.Index:
    index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if nlist is not None:
        index.train(embeddings[_training_rows(len(embeddings), nlist, _TRAIN_POINTS_PER_LIST, seed)])
        index.nprobe = nprobe
    if factory.startswith("HNSW"):
        index.hnsw.efSearch = _HNSW_EF_SEARCH
    index.add(embeddings)
    return index


def _make_ondisk_index(
    blocks: Sequence[np.ndarray], folder: Path, factory: str, nlist: int, nprobe: int, *, seed: int
) -> faiss.Index:
    """Train the coarse quantizer on a sample gathered from the blocks, then add and merge part by part."""
    count, dim = sum(len(block) for block in blocks), blocks[0].shape[1]
    trained = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    sample = gather_rows(blocks, _training_rows(count, nlist, _ONDISK_TRAIN_POINTS_PER_LIST, seed))
    trained.train(sample)
    log_stage("train", started, f"trained {factory} on {len(sample):,} of {count:,} vectors")
    del sample
    index = build_ondisk_ivf(trained, blocks, folder, write_index=write_index)
    index.nprobe = nprobe
    return index


def _training_rows(count: int, nlist: int, points_per_list: int, seed: int) -> np.ndarray:
    """Sorted rows of a random k-means training sample."""
    return np.sort(np.random.default_rng(seed).choice(count, min(count, points_per_list * nlist), replace=False))


def _default_nlist(count: int) -> int:
    """About 4·√N lists, but at least 39 training points per list (FAISS's minimum for k-means)."""
    return int(min(max(round(4 * math.sqrt(count)), 1), max(count // 39, 1)))


def _pq_parts(dim: int) -> int:
    """Sub-quantisers: the largest divisor of d that is at most d / 4 (4 dims per byte-sized code)."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def _pq_bits(count: int) -> int:
    """Bits per PQ code: 8, unless there are too few points to train 2^bits centroids."""
    return int(min(8, max(1, math.floor(math.log2(max(count / 39, 2))))))


def _recall_vs_exact(index: faiss.Index, blocks: Sequence[np.ndarray], *, seed: int) -> float:
    """Share of the exact top-10 that the index returns, for up to 1000 gallery vectors as queries.

    The exact search runs block by block (knn_ground_truth), so the vectors are never stacked.
    """
    count = sum(len(block) for block in blocks)
    rows = np.random.default_rng(seed).choice(count, min(count, _RECALL_QUERIES), replace=False)
    order = np.argsort(rows)
    queries = np.empty((len(rows), blocks[0].shape[1]), dtype=np.float32)
    queries[order] = gather_rows(blocks, rows[order])
    k = min(_RECALL_K, count)
    _, exact = knn_ground_truth(queries, row_chunks(blocks, 1 << 18), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    _, approximate = index.search(queries, k)
    return _share_found(approximate, exact)


def recall_vs_exact_of(gallery: Gallery, *, seed: int = 0) -> float:
    """``_recall_vs_exact`` of a loaded gallery, whose ids need not be its rows (after --add and --remove)."""
    vectors = gallery.vectors()
    count = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(count, min(count, _RECALL_QUERIES), replace=False))
    queries, k = vectors[rows], min(_RECALL_K, count)
    blocks = (vectors[start : start + (1 << 16)] for start in range(0, count, 1 << 16))
    _, exact_rows = knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)
    exact = gallery.items.ids[exact_rows]
    _, approximate = gallery.search(queries, k)
    return _share_found(approximate, exact)


def _share_found(approximate: np.ndarray, exact: np.ndarray) -> float:
    """The share of each query's exact top k [M, k] that its approximate top k [M, k] holds, over all queries."""
    found = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact))
    return round(found / exact.size, 4)


def _on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Exact (flat) search is one big matrix product; run it on the GPUs when this FAISS build has them."""
    if isinstance(index, faiss.IndexFlat) and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest.json of a gallery folder (without loading the rest)."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GalleryMismatchError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise GalleryMismatchError(f"{path} must hold a JSON object")
    if manifest.get("format_version") not in READ_FORMATS:  # before the keys: older formats lack some
        raise GalleryMismatchError(
            f"{MANIFEST_FILE} format_version is {manifest.get('format_version')!r}; this version reads "
            f"{', '.join(map(str, READ_FORMATS))}: rebuild the gallery with `sct index`"
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise GalleryMismatchError(f"{MANIFEST_FILE} lacks {', '.join(missing)}")
    roots = manifest["image_roots"]
    if not isinstance(roots, list) or not roots or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
        raise GalleryMismatchError(
            f"{MANIFEST_FILE} image_roots must be a non-empty list of absolute folders, " f"got {str(roots)[:200]}"
        )
    probe_values = manifest["probe_embedding"]
    if not isinstance(probe_values, list) or not all(type(v) in (int, float) for v in probe_values):
        raise GalleryMismatchError(
            f"{MANIFEST_FILE} probe_embedding must be a list of numbers, " f"got {str(probe_values)[:200]}"
        )
    if manifest["metric"] != "inner_product":
        raise GalleryMismatchError(f"{MANIFEST_FILE} metric is {manifest['metric']!r}, expected 'inner_product'")
    if manifest.get("storage", "memory") not in STORAGES:  # galleries written before storage existed lack it
        raise GalleryMismatchError(
            f"{MANIFEST_FILE} storage is {manifest['storage']!r}; this version reads " f"{', '.join(STORAGES)}"
        )
    return manifest


def _check_agree(what: str, *sources: tuple[str, Any]) -> None:
    """Raise GalleryMismatchError naming each (source, value) unless all values are equal."""
    if any(value != sources[0][1] for _, value in sources):
        listed = ", ".join(f"{source} = {value}" for source, value in sources)
        raise GalleryMismatchError(f"{what} mismatch: {listed}")
