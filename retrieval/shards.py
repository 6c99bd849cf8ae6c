"""Index shards: a gallery's images embedded in slices, anywhere, then merged into one gallery folder.

``sct index --shard I/N`` embeds slice I (counting from 0) of the N contiguous
slices of the image list and writes a shard folder; ``sct index --merge``
checks that the shards belong together and builds one gallery from them.
Because the slices are contiguous and merged in shard order, the merged
gallery is the one a single ``sct index`` of the same images writes: same
items.csv, same vectors, same search results.

A shard folder (``shard-IIIII-of-NNNNN``; ``core.shards.ShardSpec`` names the slice)::

    shard.json       format_version, shard, shards, images {start, stop, total, list_sha256},
                     count, unreadable, model_sha256, embedding_dim, dataset, split, created,
                     image_roots (the resolved data root; the merged gallery's image_roots are their union)
    embeddings.npy   float32 [count, d], unit vectors of the readable images of the slice
    items.csv        id,path,label[,chain] with ids counted from 0 in this shard
    model.onnx       the model that embedded them
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_directory
from core.errors import UserError, UserFileNotFoundError, UserValueError
from core.shards import ShardSpec
from retrieval.embedder import file_sha256
from retrieval.gallery import (
    FORMAT_VERSION,
    ITEMS_FILE,
    MODEL_FILE,
    GalleryItem,
    build_gallery,
    read_items,
    write_items,
)

SHARD_FILE = "shard.json"
EMBEDDINGS_FILE = "embeddings.npy"
_SHARD_NAME = re.compile(r"shard-\d+-of-\d+")


class ShardMismatchError(UserError, ValueError):
    """Shard folders that cannot be merged into one gallery."""


def list_sha256(sources: Sequence[tuple[str, str, str | None]]) -> str:
    """Identity of a whole image list of (path, label, chain): shards cut from different lists never merge."""
    digest = hashlib.sha256()
    for path, label, chain in sources:
        digest.update(json.dumps([str(path), label, chain]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def write_shard(
    parent: str | os.PathLike[str],
    shard: ShardSpec,
    embeddings: np.ndarray,
    items: Sequence[GalleryItem],
    model_path: str | os.PathLike[str],
    *,
    total_images: int,
    image_list_sha256: str,
    unreadable: int = 0,
    dataset: str,
    split: str,
    image_roots: Sequence[str],
) -> Path:
    """Write ``parent/shard-IIIII-of-NNNNN`` atomically and return it.

    ``items`` (ids 0..count-1) and the rows of ``embeddings`` are the readable
    images of slice ``shard.bounds(total_images)`` of the list identified by
    ``image_list_sha256`` (see ``list_sha256``), lying in the folders
    ``image_roots`` (see ``build_gallery``).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(items) != len(embeddings):
        raise ValueError(f"{len(items)} items for embeddings of shape {list(embeddings.shape)}")
    start, stop = shard.bounds(total_images)
    meta = {
        "format_version": FORMAT_VERSION,
        "shard": shard.index,
        "shards": shard.count,
        "images": {"start": start, "stop": stop, "total": total_images, "list_sha256": image_list_sha256},
        "count": len(items),
        "unreadable": unreadable,
        "model_sha256": file_sha256(model_path),
        "embedding_dim": int(embeddings.shape[1]),
        "dataset": dataset,
        "split": split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_roots": sorted({os.path.realpath(root) for root in image_roots}),
    }
    folder = Path(parent) / shard.folder_name
    with atomic_directory(folder) as staging:
        shutil.copyfile(model_path, staging / MODEL_FILE)
        np.save(staging / EMBEDDINGS_FILE, embeddings)
        write_items(staging / ITEMS_FILE, items)
        (staging / SHARD_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


@dataclass(frozen=True)
class Shard:
    """A shard folder's metadata; its vectors and items are read on demand."""

    directory: Path
    meta: dict[str, Any]

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(self.meta["shard"], self.meta["shards"])

    def vectors(self) -> np.ndarray:
        """embeddings.npy, memory-mapped (read as needed, never all at once)."""
        return np.load(self.directory / EMBEDDINGS_FILE, mmap_mode="r")

    def items(self) -> list[GalleryItem]:
        items = read_items(self.directory / ITEMS_FILE)
        if len(items) != self.meta["count"]:
            raise ShardMismatchError(
                f"shard {self.directory}: {ITEMS_FILE} has {len(items)} rows, {SHARD_FILE} "
                f"count is {self.meta['count']}"
            )
        return items


def read_shard(directory: str | os.PathLike[str]) -> Shard:
    """The shard in ``directory``, its files checked against shard.json."""
    directory = Path(directory)
    if not (directory / SHARD_FILE).is_file():
        raise UserFileNotFoundError(
            f"{directory} is not an index shard (no {SHARD_FILE}); shards are written by " f"`sct index --shard I/N`"
        )
    for file in (EMBEDDINGS_FILE, ITEMS_FILE, MODEL_FILE):
        if not (directory / file).is_file():
            raise UserFileNotFoundError(f"shard {directory} lacks {file}")
    try:
        meta = json.loads((directory / SHARD_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardMismatchError(f"{directory / SHARD_FILE} is not valid JSON: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardMismatchError(
            f"shard {directory}: format_version is {meta.get('format_version')!r}; "
            f"this version reads {FORMAT_VERSION}: write the shard again with `sct index "
            f"--shard` or `sct embed`"
        )
    shard = Shard(directory, meta)
    model_sha = file_sha256(directory / MODEL_FILE)
    if model_sha != meta["model_sha256"]:
        raise ShardMismatchError(
            f"shard {directory}: sha256 of {MODEL_FILE} is {model_sha}, {SHARD_FILE} says " f"{meta['model_sha256']}"
        )
    shape = list(shard.vectors().shape)
    if shape != [meta["count"], meta["embedding_dim"]]:
        raise ShardMismatchError(
            f"shard {directory}: {EMBEDDINGS_FILE} has shape {shape}, {SHARD_FILE} says "
            f"{meta['count']} × {meta['embedding_dim']}"
        )
    return shard


def shard_folders(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The given shard folders, a folder without shard.json standing for its shard-*-of-* subfolders."""
    folders = []
    for path in map(Path, paths):
        inside = sorted(p for p in path.iterdir() if _SHARD_NAME.fullmatch(p.name)) if path.is_dir() else []
        folders.extend(inside if inside and not (path / SHARD_FILE).exists() else [path])
    return folders


def check_shards(shards: Sequence[Shard]) -> list[Shard]:
    """The shards in shard order, once it is checked that they are all N slices of one list, by one model."""
    if not shards:
        raise ShardMismatchError("no shard given")
    for key, what in (
        ("embedding_dim", "embedding dimension"),
        ("model_sha256", "model sha256"),
        ("shards", "shard count N"),
    ):
        values = {shard.meta[key] for shard in shards}
        if len(values) > 1:
            listed = "; ".join(f"{shard.directory} ({shard.spec}): {shard.meta[key]}" for shard in shards)
            raise ShardMismatchError(f"shards disagree on the {what}: {listed}")
    sources = {
        (s.meta["dataset"], s.meta["split"], s.meta["images"]["total"], s.meta["images"]["list_sha256"]) for s in shards
    }
    if len(sources) > 1:
        listed = "; ".join(
            f"{s.directory}: {s.meta['dataset']} {s.meta['split']}, {s.meta['images']['total']:,} "
            f"images, list sha256 {s.meta['images']['list_sha256'][:12]}"
            for s in shards
        )
        raise ShardMismatchError(f"shards were cut from different image lists: {listed}")
    by_index: dict[int, Shard] = {}
    for shard in shards:
        if shard.spec.index in by_index:
            raise ShardMismatchError(
                f"shard {shard.spec} given twice: {by_index[shard.spec.index].directory} " f"and {shard.directory}"
            )
        by_index[shard.spec.index] = shard
    count = shards[0].meta["shards"]
    missing = [f"{index}/{count}" for index in range(count) if index not in by_index]
    if missing:
        given = ", ".join(sorted(str(shard.spec) for shard in shards))
        raise ShardMismatchError(f"missing shard(s) {', '.join(missing)}; given {given}")
    for shard in shards:
        expected = shard.spec.bounds(shard.meta["images"]["total"])
        if (shard.meta["images"]["start"], shard.meta["images"]["stop"]) != expected:
            covered = f"[{shard.meta['images']['start']}, {shard.meta['images']['stop']})"
            raise ShardMismatchError(
                f"shard {shard.directory} covers images {covered}, but shard {shard.spec} of "
                f"{shard.meta['images']['total']} images is [{expected[0]}, {expected[1]})"
            )
    return [by_index[index] for index in range(count)]


def merge_shards(
    shard_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    index_type: str = "flat",
    storage: str = "memory",
    nlist: int | None = None,
    nprobe: int | None = None,
) -> Path:
    """Build one gallery folder from all N shards of an image list (see ``build_gallery``).

    Ids are the rows of the items of shard 0, then shard 1, and so on. The
    shards' vectors are memory-mapped; with ``storage="ondisk"`` they are read
    a part at a time and never all held in memory. The gallery's image roots
    are those of all the shards.
    """
    folders = shard_folders(shard_dirs)
    out = Path(out_dir).resolve()
    if any(out == folder.resolve() or out in folder.resolve().parents for folder in folders):
        raise UserValueError(
            f"the gallery folder {out_dir} would replace the shards being merged; choose another --out"
        )
    shards = check_shards([read_shard(folder) for folder in folders])
    if not sum(shard.meta["count"] for shard in shards):
        raise UserValueError("the shards hold no readable image; nothing to index")
    items: list[GalleryItem] = []
    for shard in shards:
        offset = len(items)
        items.extend(GalleryItem(offset + item.id, item.path, item.label, item.chain) for item in shard.items())
    return build_gallery(
        out_dir,
        [shard.vectors() for shard in shards],
        items,
        shards[0].directory / MODEL_FILE,
        dataset=shards[0].meta["dataset"],
        split=shards[0].meta["split"],
        index_type=index_type,
        storage=storage,
        nlist=nlist,
        nprobe=nprobe,
        image_roots=[root for shard in shards for root in shard.meta["image_roots"]],
    )
