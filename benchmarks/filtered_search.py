"""Filtered search against unfiltered search on the same gallery, same run: milliseconds per query.

Builds a gallery of N random unit vectors (labels: 1,000 classes of equal size) and times `Gallery.search`
for single queries with one FAISS thread (as the server searches), interleaved: unfiltered, then filters that
allow about 0.1%, 1%, 10% and 50% of the items (a set of labels), and an id range of 50%. Filters allowing up
to EXACT_FILTER_MAX items are ranked exactly over their stored vectors, larger ones through FAISS's
IDSelectorBitmap. Medians over the queries go to benchmarks/results/filtered_search.md, as ms and as a ratio to
the unfiltered search of the same run.

    python -m benchmarks.filtered_search                        # 100,000 × 128, flat
    python -m benchmarks.filtered_search --index-type hnsw
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.fixtures.tiny_onnx import make_tiny_model
from benchmarks.recording import append_row, machine, now_utc, this_command
from retrieval.filters import SearchFilter
from retrieval.gallery import EXACT_FILTER_MAX, Gallery, GalleryItem, build_gallery

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "filtered_search.md"
CLASSES = 1000
#: (column, share of the classes a label filter allows; None: the id range of the first half)
FILTERS = [("0.1%", 0.001), ("1%", 0.01), ("10%", 0.1), ("50%", 0.5), ("ids 50%", None)]
HEADER = f"""\
# Filtered vs unfiltered search, same gallery, same run

Single queries, one FAISS thread, median ms per query; in brackets the ratio to the unfiltered search.
"0.1%" … "50%": a filter by label allowing that share of the items; "ids 50%": an id range of half of them.
Up to {EXACT_FILTER_MAX:,} allowed items are ranked exactly over their stored vectors; more go through FAISS's
IDSelectorBitmap.

| date (UTC) | command | machine | gallery | unfiltered ms | {" | ".join(name for name, _ in FILTERS)} | queries |
|---|---|---|---|---|{"---|" * len(FILTERS)}---|
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.filtered_search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--index-type", default="flat", choices=["flat", "ivf-flat", "hnsw"])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.items, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [GalleryItem(i, f"/data/{i}.jpg", f"class {i % CLASSES}") for i in range(args.items)]
    with tempfile.TemporaryDirectory() as scratch:
        model = make_tiny_model(Path(scratch) / "model.onnx", dim=args.dim)
        folder = build_gallery(
            Path(scratch) / "g", vectors, items, model, dataset="synthetic", split="test", index_type=args.index_type
        )
        gallery = Gallery.load(folder)
        filters: list[SearchFilter | None] = [None]
        for _, share in FILTERS:
            if share is None:
                filters.append(SearchFilter(id_range=(0, args.items // 2)))
            else:
                labels = rng.choice(CLASSES, max(1, round(share * CLASSES)), replace=False)
                filters.append(SearchFilter(labels=frozenset(f"class {label}" for label in labels)))
        queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        faiss.omp_set_num_threads(1)
        seconds: list[list[float]] = [[] for _ in filters]
        for query in queries:  # interleaved, so that a busy moment of the machine hits every column
            for column, search_filter in enumerate(filters):
                started = time.perf_counter()
                gallery.search(query[None], args.k, search_filter)
                seconds[column].append(time.perf_counter() - started)
    medians = [1000 * statistics.median(column) for column in seconds]
    cells = [f"{ms:.2f} ({ms / medians[0]:.1f}×)" for ms in medians[1:]]
    row = [
        now_utc(),
        this_command("benchmarks.filtered_search"),
        machine(),
        f"{args.items:,} × {args.dim}, {args.index_type}",
        f"{medians[0]:.2f}",
        *cells,
        str(args.queries),
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
