"""Fuzz ``POST /api/search`` of the real server over HTTP for a fixed time; record what came back.

The long variant of tests/test_reliability_uploads.py. ``python -m sct serve`` (gunicorn) serves a small
generated gallery on 127.0.0.1 and a free port; client threads send hostile requests drawn from
benchmarks/fixtures/hostile_inputs.py (every image format Pillow writes, and photos of 0.1 to 15 MB, damaged;
random bytes; broken forms, many files and parts, oversized bodies and fields, hostile filenames and fields)
until the time is up; the server has its default 16 MiB upload limit. Every answer
must be a 4xx JSON error with a reason, or a 200 whose ranking equals a brute-force search of the gallery
embeddings; a 5xx, a non-JSON answer or a wrong ranking is a failure. A body over the upload limit may
instead end with the server closing the connection after its 413 (counted as "closed"). The server's RSS is sampled
throughout, and it must still answer a good search at the end. One row is appended to
benchmarks/results/fuzz.md.

    python -m benchmarks.fuzz_search                          # 10 minutes, 2 client threads
    python -m benchmarks.fuzz_search --duration 60 --seed 3 --no-record
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.fixtures.hostile_inputs import check_answer, hostile_request, image_corpus, search_form
from benchmarks.load_test import Client, build_color_gallery, running_server
from benchmarks.recording import append_row, machine, now_utc, this_command
from catalog import ImageLoadError, decode_rgb
from retrieval.embedder import OnnxEmbedder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fuzz.md"
DEFAULT_K = 10  # sct serve's
HEADER = """\
# Fuzz: hostile requests to POST /api/search of `sct serve` (gunicorn) over HTTP

Requests from benchmarks/fixtures/hostile_inputs.py: corpus images of every format Pillow writes and photos of
0.1 to 15 MB (plain or damaged: truncated, bit-flipped, overwritten, inserted, duplicated bytes), random
bytes, and broken forms (missing or repeated fields, wrong content types, broken multipart, many parts,
oversized bodies and text fields, hostile filenames, k and index values). A failure is a 5xx, an answer that
is not JSON, a 4xx without a reason, a 200 whose ranking differs from brute force, or a dropped connection
other than on a body over the limit. "closed": the server closed the connection on a body over the upload
limit while it was being sent. Server RSS is master + workers, sampled every 0.2 s; flat after the first
quarter means no per-request leak (the first quarter warms up the allocator's arenas and the per-worker
caches).

| date (UTC) | command | machine | duration | inputs tried | by kind | HTTP statuses | failures | server RSS at start, ¼, ½, ¾, end of the run (max), MiB |
|---|---|---|---|---|---|---|---|---|
"""


class Fuzzer:
    """Client threads sending hostile requests, and the tally of what came back."""

    def __init__(self, server, model: Path, embeddings: np.ndarray, corpus, max_upload_bytes: int) -> None:
        self.server, self.corpus, self.max_upload_bytes = server, corpus, max_upload_bytes
        self.embedder, self.embeddings = OnnxEmbedder(model), embeddings
        self.kinds: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def run(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        client = Client(self.server, timeout_s=60)
        while time.monotonic() < deadline:
            request = hostile_request(rng, self.corpus, self.max_upload_bytes, index_names=("colors",))
            outcome, problem = self.send(client, request)
            with self.lock:
                self.kinds[request.kind.split(":")[0]] += 1
                self.statuses[outcome] += 1
                if problem:
                    self.failures.append(f"{request.kind}: {problem}")
        client.close()

    def send(self, client: Client, request) -> tuple[str, str | None]:
        """(outcome for the histogram, failure or None) of one request."""
        try:
            status, content_type, body = client.post("/api/search", request.body, request.content_type)
        except (OSError, http.client.HTTPException) as exc:
            if len(request.body) > self.max_upload_bytes:  # refused (413) and closed while the body was sent
                return "closed", None
            return "connection error", f"{type(exc).__name__}: {exc}"
        try:
            answer = check_answer(status, content_type, body)
            if status == 200:
                self.check_ranking(request, answer)
        except (AssertionError, ValueError, KeyError, ImageLoadError) as exc:
            return str(status), f"HTTP {status}: {exc}"[:500]
        return str(status), None

    def check_ranking(self, request, answer: dict) -> None:
        images = request.batch or (request.image,)
        assert images[0] is not None, f"{request.kind} answered 200"
        queries = answer["queries"] if request.batch else [answer]
        assert len(queries) == len(images), f"{len(images)} images answered with {len(queries)} queries"
        k = int(request.k) if request.k is not None and request.k.strip() else DEFAULT_K
        spec = self.embedder.preprocessing
        for image, query_answer in zip(images, queries):
            query = self.embedder.embed_images([decode_rgb(image, min_side=spec.decode_side)])[0]
            scores = self.embeddings @ query
            expected = np.argsort(-scores, kind="stable")[: min(k, len(scores))].tolist()
            ids = [result["id"] for result in query_answer["results"]]
            assert ids == expected, f"ranking {ids} differs from brute force {expected}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fuzz_search",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n  python -m benchmarks.fuzz_search\n"
        "  python -m benchmarks.fuzz_search --duration 60 --seed 3 --no-record",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of fuzzing (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="client threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request generator (default: %(default)s)")
    parser.add_argument(
        "--max-upload-mb", type=float, default=16, help="the server's upload limit (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help=f"do not append a row to {RESULTS.name}")
    args = parser.parse_args(argv)
    max_upload_bytes = int(args.max_upload_mb * (1 << 20))

    corpus = image_corpus(args.seed, photos=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model, embeddings, _ = build_color_gallery(root, root / "colors", per_class=8)
        with running_server([root / "colors"], max_upload_mb=args.max_upload_mb, log_dir=root) as server:
            fuzzer = Fuzzer(server, model, embeddings, corpus, max_upload_bytes)
            rss: list[int] = [server.rss_kib()]
            deadline = time.monotonic() + args.duration
            threads = [
                threading.Thread(target=fuzzer.run, args=(args.seed * 1000 + i, deadline)) for i in range(args.threads)
            ]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                rss.append(server.rss_kib())
                time.sleep(0.2)
            rss.append(server.rss_kib())
            still_serving = _still_serving(server, corpus)
            tracebacks = server.log.read_text(errors="replace").count("Traceback")
    tried = sum(fuzzer.kinds.values())
    if not still_serving:
        fuzzer.failures.append("the server did not answer a good search after the run")
    if tracebacks:
        fuzzer.failures.append(f"the server logged {tracebacks} traceback(s)")
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in fuzzer.kinds.most_common())
    statuses = ", ".join(f"{status}: {count:,}" for status, count in sorted(fuzzer.statuses.items()))
    start, end, peak = rss[0] / 1024, rss[-1] / 1024, max(rss) / 1024
    quarters = " → ".join(f"{rss[min(len(rss) - 1, q * len(rss) // 4)] / 1024:.0f}" for q in range(5))
    print(
        f"{tried:,} inputs in {args.duration:g} s ({kinds}); statuses {statuses}; "
        f"{len(fuzzer.failures)} failures; server RSS {start:.1f} → {end:.1f} MiB (max {peak:.1f}; "
        f"by quarter {quarters})"
    )
    for failure in fuzzer.failures[:20]:
        print("  " + failure)
    if not args.no_record:
        load = os.getloadavg()[0]
        row = [
            now_utc(),
            this_command("benchmarks.fuzz_search"),
            machine(f"1-min load average {load:.1f} after"),
            f"{args.duration:g} s, {args.threads} threads",
            f"{tried:,}",
            kinds,
            statuses,
            str(len(fuzzer.failures)),
            f"{quarters} ({peak:.0f})",
        ]
        print(append_row(RESULTS, HEADER, row))
    return 1 if fuzzer.failures else 0


def _still_serving(server, corpus) -> bool:
    png = next(data for name, data in corpus if name == "PNG/RGB")
    request = search_form(png, k="3")
    try:
        status, _, body = Client(server).post("/api/search", request.body, request.content_type)
        return status == 200 and len(json.loads(body)["results"]) == 3
    except (OSError, http.client.HTTPException, ValueError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
