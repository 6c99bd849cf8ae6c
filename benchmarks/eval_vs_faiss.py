"""Leave-one-out Recall@K (``retrieval.metrics.evaluate``) against a bare ``faiss.knn`` call.

Target: on 60,000 × 512 (the size of the SOP test set) the evaluation
should take at most 1.2× one exact kNN search of the same depth on the same
data, in O(N·K) memory rather than the N × N matrix of the official code.

Both run in this process on the same random unit vectors (5 images per class,
so depth = max(K) = 8), interleaved, and the median of the repeats is
compared. Each run is traced by tracemalloc (numpy's allocations; FAISS's
own buffers are not traced, and the tracing costs both sides the same few
calls); the process's peak RSS is reported too. One line is appended to
benchmarks/results/eval_vs_faiss.md.

    python -m benchmarks.eval_vs_faiss                    # the full size; a few minutes on 2 cores
    python -m benchmarks.eval_vs_faiss --n 5000 --no-record   # a quick smoke run
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from benchmarks.recording import append_row, machine, now_utc, this_command
from retrieval.metrics import evaluate

RESULTS = Path(__file__).resolve().parent / "results" / "eval_vs_faiss.md"
KS = (1, 2, 4, 8)
HEADER = """\
# Leave-one-out Recall@K vs a bare faiss.knn call

Target: `evaluate` ≤ 1.2 × `faiss.knn` of the same depth, O(N·K) memory.
Times are medians; "traced" is tracemalloc's peak of numpy allocations during a call (FAISS's buffers untraced).

| date (UTC) | command | machine | N × d | depth | evaluate s | faiss.knn s | ratio | traced MB evaluate / knn | N×N float32 MB | peak RSS MB |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.eval_vs_faiss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=60_000, help="gallery size (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=5, help="images per class (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = parser.parse_args()

    embeddings, labels = random_gallery(args.n, args.dim, args.per_class)
    depth = max(max(KS), args.per_class - 1)

    def run_evaluate() -> object:
        return evaluate(embeddings, labels, KS)

    def run_knn() -> object:
        return faiss.knn(embeddings, embeddings, depth, metric=faiss.METRIC_INNER_PRODUCT)

    evaluate_runs, knn_runs = [], []
    for repeat in range(args.repeats):
        evaluate_runs.append(measured(run_evaluate))
        knn_runs.append(measured(run_knn))
        seconds = evaluate_runs[-1][0], knn_runs[-1][0]
        print(f"run {repeat + 1}: evaluate {seconds[0]:.2f} s, faiss.knn {seconds[1]:.2f} s", file=sys.stderr)
    evaluate_s, knn_s = (statistics.median(seconds for seconds, _ in runs) for runs in (evaluate_runs, knn_runs))
    evaluate_mb, knn_mb = (max(peak for _, peak in runs) for runs in (evaluate_runs, knn_runs))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    row = [
        now_utc(),
        this_command("benchmarks.eval_vs_faiss"),
        machine(f"FAISS {faiss.omp_get_max_threads()} threads"),
        f"{args.n:,} × {args.dim}",
        str(depth),
        f"{evaluate_s:.2f}",
        f"{knn_s:.2f}",
        f"{evaluate_s / knn_s:.3f}",
        f"{evaluate_mb:.1f} / {knn_mb:.1f}",
        f"{args.n * args.n * 4 / 2**20:,.0f}",
        f"{peak_rss_mb:,.0f}",
    ]
    if args.no_record:
        print("| " + " | ".join(row) + " |")
    else:
        print(append_row(RESULTS, HEADER, row))
    return 0


def random_gallery(count: int, dim: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((count, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(count) // per_class)
    return embeddings, labels


def measured(function: Callable[[], object]) -> tuple[float, float]:
    """Seconds taken and tracemalloc's peak in MiB."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        function()
        seconds = time.perf_counter() - start
        return seconds, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
