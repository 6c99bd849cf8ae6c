"""Re-ranking (``sct eval --rerank``): Recall@1 and MAP@R of each method against none, and its cost per query.

For each gallery folder given and each method (none, k-reciprocal, qe, dba with their defaults, or those given)
this runs the leave-one-out evaluation of ``sct eval`` (``retrieval.evaluation.evaluate_gallery``) and times it;
"eval ms/query" is its wall-clock time over the queries, the offline work of DBA and the neighbour lists of
k-reciprocal included. "search ms/query" times ``retrieval.rerank.rerank_search`` one query at a time (top 10)
with ``--search-queries`` gallery vectors as queries, twice: the first time (cold) and again (warm).
One row per gallery and method is appended to benchmarks/results/rerank.md.

    python -m benchmarks.rerank --gallery demo=index_data/fashion-mnist
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.recording import append_row, machine, now_utc, this_command
from retrieval.evaluation import evaluate_gallery
from retrieval.gallery import Gallery
from retrieval.rerank import METHODS, RerankParams, rerank_search

RESULTS = Path(__file__).parent / "results" / "rerank.md"
HEADER = """\
# Re-ranking: k-reciprocal, α-query expansion, database-side augmentation

Leave-one-out evaluation of each gallery (`sct eval`'s metric code, the query left out of everything the
re-ranking draws on), each method with its defaults unless the command says otherwise: k-reciprocal k1 = 20,
k2 = 6, λ = 0.3 over the top 100; qe and dba α = 3, n = 10. Δ is against `none` on the same gallery. "eval
ms/query": the whole evaluation's wall-clock time over its queries (for dba the augmentation of the gallery, for
k-reciprocal the neighbour lists included). "search ms/query, cold / warm": median of `rerank_search` of one
gallery vector at a time, top 10, after a warm-up search (dba's augmented vectors are built then): the first time
each query is searched, and again, when k-reciprocal finds the neighbour lists it reads kept from the first time.
Details: docs/RERANKING.md.

| date (UTC) | command | machine | gallery | items | method | Recall@1 | Δ | MAP@R | Δ | eval ms/query | search ms/query, cold / warm |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def search_ms(gallery: Gallery, params: RerankParams, queries: int) -> tuple[float, float]:
    """Median milliseconds of one ``rerank_search`` of one gallery vector, over ``queries`` vectors: the first
    time each is searched (cold), and again (warm: the neighbour lists it reads are kept from the first time)."""
    vectors = gallery.vectors()[np.linspace(0, len(gallery.vectors()) - 1, queries + 1).astype(np.int64)]
    settings = {key: value for key, value in vars(params).items() if key != "method"}
    rerank_search(gallery, vectors[:1], 10, params.method, **settings)  # warm-up: dba's vectors are built here
    medians = []
    for _ in ("cold", "warm"):
        seconds = []
        for vector in vectors[1:]:
            started = time.perf_counter()
            rerank_search(gallery, vector[None], 10, params.method, **settings)
            seconds.append(time.perf_counter() - started)
        medians.append(1000 * float(np.median(seconds)))
    return medians[0], medians[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", action="append", required=True, metavar="NAME=DIR", help="gallery folder")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--search-queries", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--k1", type=int, default=RerankParams.k1)
    parser.add_argument("--k2", type=int, default=RerankParams.k2)
    parser.add_argument("--candidates", type=int, default=RerankParams.candidates)
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = parser.parse_args(argv)
    for spec in args.gallery:
        name, _, folder = spec.partition("=")
        gallery = Gallery.load(folder)
        baseline: dict[str, float] = {}
        for method in ["none", *[m for m in args.method if m != "none"]]:
            params = RerankParams(method, k1=args.k1, k2=args.k2, candidates=args.candidates)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            results = evaluate_gallery(gallery, (1,), rerank=params, progress=False)
            eval_ms = 1000 * (time.perf_counter() - started) / results["queries"]
            recall, map_r = results["recall@1"], results["map@r"]
            baseline = baseline or {"recall": recall, "map": map_r}
            row = [
                now_utc(),
                this_command("benchmarks.rerank"),
                machine(f"1-min load average {load:.1f} before the row"),
                name,
                f"{len(gallery.vectors()):,} × {gallery.vectors().shape[1]}",
                method,
                f"{recall:.4f}",
                f"{recall - baseline['recall']:+.4f}",
                f"{map_r:.4f}",
                f"{map_r - baseline['map']:+.4f}",
                f"{eval_ms:.2f}",
                "{:.2f} / {:.2f}".format(*search_ms(gallery, params, args.search_queries)),
            ]
            print(append_row(RESULTS, HEADER, row) if not args.no_record else row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
