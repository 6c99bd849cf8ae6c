"""Building the Hierarchical Triplet Loss class tree (training.htl.build_tree) at SOP scale.

Random unit embeddings, a fixed number of images per class; each size is built
once to warm up, then timed three times and the median kept. The build covers
everything a rebuild does after embedding: class means, within-class distances,
the condensed class-distance matrix, average linkage, the level cuts and the
FAISS nearest-class search. One row per size is appended to
benchmarks/results/htl_tree.md.

    python -m benchmarks.htl_tree                              # 1,000 and 10,000 classes × 5 images, 512-d
    python -m benchmarks.htl_tree --classes 11318 --images-per-class 5   # the SOP training split
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.recording import append_row, machine, now_utc, this_command
from training.htl import build_tree

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "htl_tree.md"
HEADER = """\
# HTL class tree: build_tree on random unit embeddings (median of 3 after one warm-up)

Time from embeddings to tree: class means, within-class distances, condensed class distances,
average linkage (scipy), 16 level cuts and the FAISS nearest-class search (2·m = 8 neighbours).
Embedding the training images, which a rebuild also does, is not included.

| date (UTC) | command | machine | classes | images | dim | seconds (median) | seconds (min) |
|---|---|---|---|---|---|---|---|
"""


def time_build(classes: int, per_class: int, dim: int, levels: int, neighbours: int, repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(classes * per_class, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    build_tree(embeddings, labels, classes, levels=levels, neighbours=neighbours)  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        build_tree(embeddings, labels, classes, levels=levels, neighbours=neighbours)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.htl_tree", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--images-per-class", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import faiss

    where = machine(f"{faiss.omp_get_max_threads()} FAISS threads")
    for classes in args.classes:
        seconds = time_build(classes, args.images_per_class, args.dim, args.levels, args.neighbours, args.repeats)
        print(
            f"{classes} classes × {args.images_per_class} images, {args.dim}-d: median "
            f"{statistics.median(seconds):.2f} s over {args.repeats}",
            file=sys.stderr,
        )
        row = [
            now_utc(),
            this_command("benchmarks.htl_tree"),
            where,
            str(classes),
            str(classes * args.images_per_class),
            str(args.dim),
            f"{statistics.median(seconds):.2f}",
            f"{min(seconds):.2f}",
        ]
        print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
