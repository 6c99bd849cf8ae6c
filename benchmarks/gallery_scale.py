"""A gallery bigger than one process should hold: 2 million vectors, sharded, merged into an on-disk IVF gallery.

The product's sharded path, end to end on CPU, with synthetic vectors in place
of embedded images (embedding speed is benchmarks/index_throughput.py's
subject):

1. shards: each of N shard processes generates its slice of the vectors on the
   fly (unit vectors around random cluster centres, so IVF recall means
   something) and writes a shard folder with `retrieval.shards.write_shard`,
   as `sct index --shard I/N` does after embedding. No process ever holds all
   the vectors.
2. merge: one process runs `retrieval.shards.merge_shards` with
   `index_type="ivf-flat", storage="ondisk"`, i.e. `sct index --merge ...
   --index-type ivf-flat --storage ondisk`: k-means on a sample, each shard
   added to an empty copy of the trained index, `merge_ondisk` into
   index.ivfdata, items.csv, a Recall@10 self-check and a verifying load.
3. serve: a fresh process loads the gallery with `Gallery.load` (lists
   memory-mapped) and times single-query searches; recall@10 is measured on
   1,000 held-out queries against exact search (IndexFlatIP, block by block
   over the shards' vectors, faiss.contrib.exhaustive_search.knn_ground_truth).

Each stage runs in its own process so that its peak memory is its own:
VmHWM (getrusage maxrss: every resident page, memory-mapped files included)
and the peak of RssAnon (sampled every 20 ms: the process's own memory, which
unlike page cache cannot be dropped under pressure). Items are synthetic
(paths `synthetic/00001234.jpg` that do not exist, labels = cluster ids); the
model is the tests' tiny 64-d ONNX model, used only for its identity. One row
is appended to benchmarks/results/gallery_scale.md.

    python -m benchmarks.gallery_scale                                    # 2,000,000 × 64-d, 4 shards
    python -m benchmarks.gallery_scale --vectors 100000 --no-record       # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from benchmarks.fixtures.tiny_onnx import make_tiny_model
from benchmarks.recording import append_row, machine, now_utc, this_command
from core.shards import ShardSpec
from retrieval.gallery import Gallery, GalleryItem
from retrieval.index_files import row_chunks
from retrieval.shards import merge_shards, read_shard, shard_folders, write_shard

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gallery_scale.md"
HEADER = """\
# Galleries bigger than RAM: sharded build of an on-disk IVF gallery, on CPU

`python -m benchmarks.gallery_scale`: synthetic unit vectors (a mixture around random cluster centres)
generated shard by shard in separate processes, merged by `merge_shards(..., index_type="ivf-flat",
storage="ondisk")` (what `sct index --merge ... --index-type ivf-flat --storage ondisk` runs), then loaded
memory-mapped by `Gallery.load` in a fresh process. Seconds; MB = 2^20 bytes.

- build: k-means training on a sample / adding each shard to an empty copy of the trained index / merge_ondisk
  into index.ivfdata; "merge total" is the whole merge process (reading shard items, checks, the three steps,
  items.csv, the Recall@10 self-check and the verifying load).
- memory, per process: "anon" = peak RssAnon (the process's own memory), "hwm" = VmHWM (all resident pages,
  memory-mapped shard and index files included; those are page cache the kernel can drop). "index build"
  is the merge process's anon peak during train/add/merge minus its anon before training ("before": the
  libraries and the items, already loaded), i.e. what the index build itself needs.
- query: single-query `Gallery.search` latency at the default nprobe, page cache warm (the gallery was
  just written); recall@10 of 1,000 held-out queries against exact search (IndexFlatIP by blocks).

| date (UTC) | command | machine | vectors × d | shards | nlist / nprobe | train / add per shard / merge s | merge total s | shard anon / hwm MB (max) | merge anon / hwm MB | index build MB | serve anon / hwm MB | vector set MB | on disk MB | load s | query p50 / p99 ms | recall@10 (nprobe) |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


class MemoryWatch:
    """Samples this process's RssAnon every 20 ms; ``peak(since, until)`` and VmHWM at the end."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), rss_anon_kb()))
            if self._stop.wait(0.02):
                return

    def peak_mb(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max(kb for t, kb in self.samples if since <= t <= until) / 1024

    def at_mb(self, moment: float) -> float:
        return min(self.samples, key=lambda sample: abs(sample[0] - moment))[1] / 1024

    @staticmethod
    def hwm_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def centres(clusters: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def mixture(
    rows: int, centre_vectors: np.ndarray, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` unit vectors, each its cluster's centre plus Gaussian noise, and their cluster ids."""
    cluster = rng.integers(0, len(centre_vectors), rows)
    vectors = centre_vectors[cluster] + noise * rng.standard_normal((rows, centre_vectors.shape[1]), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), cluster


def shard_stage(args: argparse.Namespace, index: int, model: Path, shards_dir: Path) -> dict:
    """Generate and write shard ``index``: one machine's share, as `sct index --shard` would write it."""
    with MemoryWatch() as watch:
        started = time.perf_counter()
        shard = ShardSpec(index, args.shards)
        start, stop = shard.bounds(args.vectors)
        vectors, cluster = mixture(
            stop - start,
            centres(args.clusters, args.dim, args.seed),
            args.noise,
            np.random.default_rng([args.seed, index]),
        )
        items = [
            GalleryItem(row, f"synthetic/{start + row:08d}.jpg", f"cluster {c}")
            for row, c in enumerate(cluster.tolist())
        ]
        recipe = f"gallery_scale {args.vectors} {args.dim} {args.clusters} {args.noise} {args.seed}"
        write_shard(
            shards_dir,
            shard,
            vectors,
            items,
            model,
            total_images=args.vectors,
            image_list_sha256=hashlib.sha256(recipe.encode()).hexdigest(),
            dataset="synthetic",
            split="gallery",
        )
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "anon_mb": watch.peak_mb(), "hwm_mb": watch.hwm_mb()}


class StageLog(logging.Handler):
    """Collects the build stages that retrieval.index_files logs (stage, seconds, end time)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[tuple[str, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "stage"):
            self.stages.append((record.stage, record.seconds, time.perf_counter()))
            print(record.getMessage(), file=sys.stderr, flush=True)


def merge_stage(args: argparse.Namespace, shards_dir: Path, gallery: Path) -> dict:
    """`sct index --merge SHARDS --out GALLERY --index-type ivf-flat --storage ondisk`, in this process."""
    faiss.omp_set_num_threads(args.threads)
    log = StageLog()
    logger = logging.getLogger("retrieval.index_files")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    with MemoryWatch() as watch:
        started = time.perf_counter()
        merge_shards(
            [shards_dir], gallery, index_type="ivf-flat", storage="ondisk", nlist=args.nlist, nprobe=args.nprobe
        )
        seconds = time.perf_counter() - started
    train_end, train_seconds = next((end, s) for stage, s, end in log.stages if stage == "train")
    merge_end = next(end for stage, _, end in log.stages if stage == "merge")
    before_training = watch.at_mb(train_end - train_seconds)
    return {
        "seconds": seconds,
        "train": train_seconds,
        "add": [s for stage, s, _ in log.stages if stage == "add"],
        "merge": next(s for stage, s, _ in log.stages if stage == "merge"),
        "anon_mb": watch.peak_mb(),
        "hwm_mb": watch.hwm_mb(),
        "anon_before_training_mb": before_training,
        "index_build_mb": watch.peak_mb(train_end - train_seconds, merge_end) - before_training,
    }


def serve_stage(args: argparse.Namespace, shards_dir: Path, gallery_dir: Path) -> dict:
    """Load the gallery memory-mapped, time single queries, measure recall@10 against exact search."""
    faiss.omp_set_num_threads(args.threads)
    with MemoryWatch() as watch:
        started = time.perf_counter()
        gallery = Gallery.load(gallery_dir)
        load_seconds = time.perf_counter() - started
        queries, _ = mixture(
            args.queries,
            centres(args.clusters, args.dim, args.seed),
            args.noise,
            np.random.default_rng([args.seed, 10**6]),
        )  # held out: not gallery vectors
        latencies = []
        for query in queries:
            started = time.perf_counter()
            gallery.search(query[None], 10)
            latencies.append(1000 * (time.perf_counter() - started))
        default_nprobe = gallery.index.nprobe
        approximate = {}
        for nprobe in sorted({16, 64, 256, default_nprobe}):
            if nprobe <= faiss.extract_index_ivf(gallery.index).nlist:
                faiss.extract_index_ivf(gallery.index).nprobe = nprobe
                approximate[nprobe] = gallery.search(queries, 10)[1]
        anon, hwm = watch.peak_mb(), watch.hwm_mb()
    blocks = [read_shard(folder).vectors() for folder in shard_folders([shards_dir])]
    started = time.perf_counter()
    _, exact = knn_ground_truth(queries, row_chunks(blocks, 1 << 18), 10, metric_type=faiss.METRIC_INNER_PRODUCT)
    exact_seconds = time.perf_counter() - started
    recall = {
        nprobe: float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids.tolist(), exact.tolist())]))
        for nprobe, ids in approximate.items()
    }
    return {
        "load_seconds": load_seconds,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "nprobe": default_nprobe,
        "nlist": faiss.extract_index_ivf(gallery.index).nlist,
        "recall": recall,
        "exact_seconds": exact_seconds,
        "anon_mb": anon,
        "hwm_mb": hwm,
    }


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a new spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gallery_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vectors", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--clusters", type=int, default=20_000, help="mixture components")
    parser.add_argument("--noise", type=float, default=0.1, help="per-dimension noise around a centre")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: the gallery's, about 4·√N)")
    parser.add_argument("--nprobe", type=int, help="lists searched per query (default: nlist / 8)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="where to build (default: a temporary folder, deleted)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gallery-scale-", dir=args.work_dir))
    try:
        model = make_tiny_model(work / "model.onnx", dim=args.dim)
        shards_dir, gallery = work / "shards", work / "gallery"
        shard_results = []
        for index in range(args.shards):
            shard_results.append(in_fresh_process(shard_stage, args, index, model, shards_dir))
            print(f"shard {index}/{args.shards}: {shard_results[-1]}", file=sys.stderr, flush=True)
        merged = in_fresh_process(merge_stage, args, shards_dir, gallery)
        print(f"merge: {merged}", file=sys.stderr, flush=True)
        served = in_fresh_process(serve_stage, args, shards_dir, gallery)
        print(f"serve: {served}", file=sys.stderr, flush=True)
        vector_set_mb = args.vectors * args.dim * 4 / 2**20
        index_mb = ((gallery / "index.faiss").stat().st_size + (gallery / "index.ivfdata").stat().st_size) / 2**20
        on_disk = f"index {index_mb:.0f} (gallery {folder_mb(gallery):.0f}, shards {folder_mb(shards_dir):.0f})"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    shard_anon = max(r["anon_mb"] for r in shard_results)
    shard_hwm = max(r["hwm_mb"] for r in shard_results)
    below = "below" if merged["index_build_mb"] < vector_set_mb else "NOT below"
    print(
        f"vector set {vector_set_mb:.0f} MB; index build needed {merged['index_build_mb']:.0f} MB ({below} it); "
        f"merge process anon peak {merged['anon_mb']:.0f} MB (items in memory: "
        f"{merged['anon_before_training_mb']:.0f} MB before training)"
    )
    recall = ", ".join(f"{served['recall'][n]:.3f} ({n})" for n in sorted(served["recall"]))
    add = "+".join(f"{s:.1f}" for s in merged["add"])
    row = [
        now_utc(),
        this_command("benchmarks.gallery_scale"),
        machine(f"FAISS {faiss.__version__}, " f"{args.threads} OpenMP threads"),
        f"{args.vectors:,} × {args.dim}",
        str(args.shards),
        f"{served['nlist']} / {served['nprobe']}",
        f"{merged['train']:.1f} / {add} / {merged['merge']:.1f}",
        f"{merged['seconds']:.1f}",
        f"{shard_anon:.0f} / {shard_hwm:.0f}",
        f"{merged['anon_mb']:.0f} / {merged['hwm_mb']:.0f}",
        f"{merged['index_build_mb']:.0f} ({below} the vector set; {merged['anon_before_training_mb']:.0f} before)",
        f"{served['anon_mb']:.0f} / {served['hwm_mb']:.0f}",
        f"{vector_set_mb:.0f}",
        on_disk,
        f"{served['load_seconds']:.1f}",
        f"{served['p50_ms']:.2f} / {served['p99_ms']:.2f}",
        recall,
    ]
    if not args.no_record:
        print(append_row(RESULTS, HEADER, row))
    else:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
