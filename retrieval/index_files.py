"""IVF indexes whose inverted lists stay on disk: built from parts, merged, memory-mapped to search.

An on-disk IVF index is built the way ``faiss.contrib.ondisk`` intends (FAISS's
demo_ondisk_ivf.py): the coarse quantizer is trained once on a sample, each
part of the vectors (a shard, or a slice of one) is added to an empty copy of
the trained index and written to disk, and ``merge_ondisk`` concatenates the
parts' inverted lists into one ``OnDiskInvertedLists`` file, ``index.ivfdata``.
Only one part's vectors are in memory at a time, and a reader maps the lists
instead of loading them.

``index.faiss`` stores the lists' file name without a folder, and
``read_ondisk_index`` looks for it next to ``index.faiss``, so the gallery
folder can be renamed into place (core.atomic) or moved.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from core.errors import UserValueError

IVFDATA_FILE = "index.ivfdata"
#: Vectors added to one part index: a build holds about one part's vectors and lists in memory.
PART_ROWS = 1 << 20
#: Rows copied at a time out of a (possibly memory-mapped) block of vectors.
CHUNK_ROWS = 1 << 16

log = logging.getLogger(__name__)


def row_chunks(blocks: Sequence[np.ndarray], rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The rows of consecutive blocks [n_i, d], as float32 C-contiguous copies of at most ``rows`` rows."""
    for block in blocks:
        for start in range(0, len(block), rows):
            yield np.ascontiguousarray(block[start : start + rows], dtype=np.float32)


def gather_rows(blocks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The vectors at sorted global ``rows`` of the blocks stacked end to end (one copy, no full stack)."""
    pieces = []
    offset = 0
    for block in blocks:
        local = rows[(rows >= offset) & (rows < offset + len(block))] - offset
        pieces.append(np.asarray(block[local], dtype=np.float32))
        offset += len(block)
    return np.ascontiguousarray(np.concatenate(pieces))


def ondisk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The on-disk inverted lists of an IVF index, or None for any other index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def build_ondisk_ivf(
    trained: faiss.Index,
    blocks: Sequence[np.ndarray],
    folder: Path,
    *,
    write_index: Callable[[faiss.Index, Path], None],
) -> faiss.Index:
    """Add the blocks' vectors to copies of the empty ``trained`` IVF index and merge them into ``folder``.

    Ids are the global row numbers (block after block). Each block is added in
    parts of at most PART_ROWS vectors, each part written with ``write_index``
    (one that raises on a full disk: a part cut short would be mapped past its
    end) to a scratch file in ``folder``, deleted after the merge. Returns the
    merged index, whose lists are mapped from ``folder / IVFDATA_FILE``.
    """
    scratch = folder / ".parts"
    scratch.mkdir()
    try:
        parts = _write_parts(trained, blocks, scratch, write_index)
        index = faiss.clone_index(trained)
        _check_free_space(folder, sum(count for _, count in parts) * (faiss.extract_index_ivf(trained).code_size + 8))
        started = time.perf_counter()
        # merge_ondisk disowns the parts' mapped lists (they stay mapped until the process exits); their files
        # are deleted below, so their disk space returns when this process ends.
        merge_ondisk(index, [str(path) for path, _ in parts], str(folder / IVFDATA_FILE))
        log_stage("merge", started, f"merged {len(parts)} part(s) into {IVFDATA_FILE}: {index.ntotal:,} vectors")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ondisk_lists(index).filename = IVFDATA_FILE  # stored without a folder; see read_ondisk_index
    return index


def _write_parts(
    trained: faiss.Index,
    blocks: Sequence[np.ndarray],
    scratch: Path,
    write_index: Callable[[faiss.Index, Path], None],
) -> list[tuple[Path, int]]:
    """(file, vector count) of each part index written."""
    parts = []
    offset = 0
    for block in blocks:
        for start in range(0, len(block), PART_ROWS):
            started = time.perf_counter()
            part = faiss.clone_index(trained)
            for chunk in row_chunks([block[start : start + PART_ROWS]]):
                part.add_with_ids(chunk, np.arange(offset, offset + len(chunk), dtype=np.int64))
                offset += len(chunk)
            path = scratch / f"part-{len(parts):05d}.faiss"
            write_index(part, path)
            parts.append((path, part.ntotal))
            del part
            log_stage("add", started, f"added part {len(parts)} ({parts[-1][1]:,} vectors)")
    return parts


def _check_free_space(folder: Path, needed: int) -> None:
    """FAISS writes the merged lists through a memory map of a file it has only sized, not allocated:
    on a full disk that write kills the process (SIGBUS) rather than failing, so refuse beforehand."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"the merged inverted lists need {needed:,} bytes, {free:,} are free", str(folder))


def read_ondisk_index(index_path: Path, ivfdata_name: str) -> faiss.Index:
    """Read ``index_path``, mapping its inverted lists read-only from ``ivfdata_name`` in the same folder.

    This is what ``faiss.read_index(path, IO_FLAG_ONDISK_SAME_DIR |
    IO_FLAG_READ_ONLY)`` does (keep the stored file name, take the index
    file's folder), done here because FAISS announces it with a line on C
    stdout at every read, which would land in `sct search` output and server
    logs. The file's size is checked before it is mapped: reading a mapped
    file past its end kills the process (SIGBUS). Raises ValueError when the
    index is not an on-disk IVF index or the lists file does not fit it.
    """
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = ondisk_lists(index)
    if lists is None:
        raise UserValueError(f"{index_path.name} does not keep its inverted lists on disk")
    if Path(lists.filename).name != ivfdata_name:
        raise UserValueError(f"{index_path.name} keeps its inverted lists in {lists.filename}, not {ivfdata_name}")
    path = index_path.parent / ivfdata_name
    size = path.stat().st_size
    if size != lists.totsize:
        raise UserValueError(f"{ivfdata_name} is {size:,} bytes, {index_path.name} expects {lists.totsize:,}")
    lists.filename = str(path)
    lists.read_only = True
    lists.do_mmap()
    return index


def log_stage(stage: str, started: float, message: str) -> None:
    """Log a build stage with its duration; ``stage`` and ``seconds`` are attributes of the record."""
    seconds = time.perf_counter() - started
    log.info("%s in %.1f s", message, seconds, extra={"stage": stage, "seconds": seconds})
