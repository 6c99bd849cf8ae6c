"""Load test of the served app: zero errors, p50/p99 latency, requests/s, and the server's memory over the run.

The real server (``python -m sct serve``: gunicorn, gevent workers) serves a small generated gallery on
127.0.0.1 and a free port. The gallery is built by ``build_gallery`` from coloured images embedded with the
tiny ONNX model of benchmarks/fixtures/tiny_onnx.py, so the run measures the serving path (HTTP, multipart,
decode, ONNX Runtime, FAISS, JSON), not a large model. Client threads POST /api/search over keep-alive connections
(http.client) for a fixed time, up to a maximum request count. Every response must be a 200 whose ranking
equals a brute-force search of the gallery embeddings. The server's RSS (master + workers) is sampled
throughout: if the mean of the last third is no higher than that of the first, requests leak nothing.
One row is appended to benchmarks/results/load.md.

    python -m benchmarks.load_test                           # 60 s, 4 client threads, 1 worker × 4 threads
    python -m benchmarks.load_test --duration 30 --max-requests 5000 --no-record

Also the helpers of tests/test_reliability_load.py and benchmarks/fuzz_search.py: ``build_color_gallery``,
``running_server``, ``post`` and ``run_load``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.fixtures.tiny_onnx import COLORS, make_color_images, make_tiny_model
from benchmarks.recording import append_row, machine, now_utc, this_command
from catalog import decode_rgb  # the server's decoder: the brute force sees the same pixels
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import GalleryItem, build_gallery
from retrieval.image_folder import list_image_folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "load.md"
HEADER = """\
# Load: POST /api/search against `sct serve` (gunicorn) on 127.0.0.1

A small generated gallery (coloured images, the tiny ONNX model of benchmarks/fixtures/tiny_onnx.py) served by
`python -m sct serve`; client threads POST /api/search over keep-alive HTTP connections for a fixed time, up
to a maximum request count. An error is any response that is not a 200 whose ranking equals a brute-force
search of the gallery embeddings, or a failed connection. Latency is the client's, per request, in ms.
Server RSS is master + workers, sampled every 0.2 s: the mean of the first and of the last third of the run.

| date (UTC) | command | machine | server | client threads | requests | errors | p50 ms | p99 ms | requests/s | server RSS first → last third (MiB) | max RSS (MiB) |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


# --- a gallery and a server -----------------------------------------------------------------------------------


def build_color_gallery(
    root: Path, out: Path, *, classes: dict[str, tuple[int, int, int]] = COLORS, per_class: int = 8, seed: int = 0
) -> tuple[Path, np.ndarray, list[str]]:
    """Coloured images of ``classes`` under ``root``, embedded with the tiny model into gallery ``out``.

    Returns the model (``root/model.onnx``, written once), the gallery's embeddings and its labels, for
    brute-force checks.
    """
    model = root / "model.onnx"
    if not model.exists():
        make_tiny_model(model, image_size=32, dim=16)
    images = root / f"images-{out.name}-{seed}"
    make_color_images(images, classes=classes, per_class=per_class, seed=seed)
    sources = list_image_folder(images)
    result = OnnxEmbedder(model).embed_paths([path for path, _ in sources], progress=False)
    assert not result.failures, result.failures
    items = [GalleryItem(i, str(path), label) for i, (path, label) in enumerate(sources)]
    build_gallery(out, result.embeddings, items, model, dataset="synthetic", split="test")
    return model, result.embeddings, [label for _, label in sources]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running ``sct serve`` process."""

    process: subprocess.Popen
    port: int
    log: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [self.process.pid, *map(int, children.read_text().split())]
        except OSError:
            return [self.process.pid]

    def rss_kib(self) -> int:
        """Resident memory of the master and the workers together."""
        return sum(_status_kib(pid, "VmRSS") for pid in self.pids())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_server(
    index_dirs: Sequence[Path],
    *,
    workers: int = 1,
    threads: int = 4,
    max_upload_mb: float = 16,
    log_dir: Path | None = None,
    startup_timeout_s: float = 90,
    extra_args: Sequence[str] = (),
) -> Iterator[Server]:
    """``python -m sct serve`` on 127.0.0.1 and a free port (its default host), with ``extra_args``, until the
    block ends."""
    port = free_port()
    log = Path(log_dir or tempfile.mkdtemp()) / f"serve-{port}.log"
    command = [
        sys.executable,
        "-m",
        "sct",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--max-upload-mb",
        str(max_upload_mb),
        *extra_args,
    ]
    for directory in index_dirs:
        command += ["--index", str(directory)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = Server(process, port, log)
    try:
        _wait_until_healthy(server, startup_timeout_s)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # gunicorn's quick shutdown (SIGTERM waits for its graceful timeout)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"sct serve exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sct serve did not answer /healthz within {timeout_s:.0f} s:\n{server.log_tail()}")


def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- requests -------------------------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP connection to the server (one per client thread); reconnects after a failure."""

    def __init__(self, server: Server, timeout_s: float = 60) -> None:
        self.server, self.timeout_s = server, timeout_s
        self._connection: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
        """(status, Content-Type, body) of one POST; connection errors propagate (and the connection is dropped)."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.server.host, self.server.port, timeout=self.timeout_s)
        try:
            self._connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = self._connection.getresponse()
            data = response.read()
            # After a 413 the server may close the connection without reading the body (RFC 9110 15.5.14)
            if response.status == 413 or response.getheader("Connection", "").lower() == "close":
                self.close()
            return response.status, response.getheader("Content-Type", ""), data
        except BaseException:
            self.close()
            raise

    def get(self, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(self.server.url + path, timeout=self.timeout_s) as response:
            return response.status, response.read()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass
class Query:
    """A query image and the ranking a correct server returns for it."""

    image: bytes
    expected_ids: list[int]
    expected_labels: list[str]


def queries_for(
    model: Path, embeddings: np.ndarray, labels: Sequence[str], k: int, count: int = 12, seed: int = 1
) -> list[Query]:
    """PNG and JPEG queries near each class colour, with their brute-force top-k over ``embeddings``."""
    rng = np.random.default_rng(seed)
    embedder = OnnxEmbedder(model)
    queries = []
    colors = list(COLORS.values())
    for number in range(count):
        color = np.array(colors[number % len(colors)]) + rng.integers(-40, 41, 3)
        height, width = (int(v) for v in rng.integers(20, 120, 2))
        pixels = np.clip(color + rng.integers(-25, 26, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG" if number % 2 else "JPEG", quality=95)
        data = buffer.getvalue()
        image = decode_rgb(data, min_side=embedder.preprocessing.decode_side)  # as the server decodes it
        scores = embeddings @ embedder.embed_images([image])[0]
        top = np.argsort(-scores, kind="stable")[:k]
        queries.append(Query(data, top.tolist(), [labels[i] for i in top]))
    return queries


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)
    answers: list[tuple[float, dict]] = field(default_factory=list)  # (time.monotonic() sent, JSON) of 200s, if kept

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def rss_thirds_mib(self) -> tuple[float, float]:
        """Mean server RSS over the first and the last third of the samples."""
        values = [kib / 1024 for _, kib in self.rss_samples]
        third = max(len(values) // 3, 1)
        return float(np.mean(values[:third])), float(np.mean(values[-third:]))

    @property
    def max_rss_mib(self) -> float:
        return max((kib for _, kib in self.rss_samples), default=0) / 1024


def run_load(
    server: Server,
    queries: Sequence[Query],
    *,
    threads: int,
    duration_s: float,
    max_requests: int,
    k: int,
    check: Callable[[Query, dict], str | None] | None = None,
    keep_answers: bool = False,
    stop: threading.Event | None = None,
) -> LoadResult:
    """POST the queries round-robin from ``threads`` threads until ``duration_s``, ``max_requests`` or ``stop``.

    A response is an error unless it is a 200 that ``check`` (default: the expected ranking) accepts.
    """
    check = check or expected_ranking
    result = LoadResult()
    lock = threading.Lock()
    done = stop or threading.Event()
    started = time.monotonic()
    counter = iter(range(max_requests))

    def client_thread() -> None:
        client = Client(server)
        while not done.is_set() and time.monotonic() - started < duration_s:
            with lock:
                number = next(counter, None)
            if number is None:
                break
            query = queries[number % len(queries)]
            request = search_form(query.image, filename=b"query.png", k=str(k))
            sent = time.monotonic()
            try:
                status, _, body = client.post("/api/search", request.body, request.content_type)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    result.requests += 1
                    result.errors.append(f"request {number}: {type(exc).__name__}: {exc}")
                continue
            elapsed = time.monotonic() - sent
            problem = f"HTTP {status}: {body[:300]!r}" if status != 200 else None
            answer = None
            if problem is None:
                answer = json.loads(body)
                problem = check(query, answer)
            with lock:
                result.requests += 1
                result.statuses[status] += 1
                result.latencies_s.append(elapsed)
                if problem:
                    result.errors.append(f"request {number}: {problem}")
                if keep_answers and answer is not None:
                    result.answers.append((sent, answer))
        client.close()

    def sample_memory() -> None:
        while not finished.is_set():
            result.rss_samples.append((time.monotonic() - started, server.rss_kib()))
            finished.wait(0.2)

    finished = threading.Event()
    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    workers = [threading.Thread(target=client_thread) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    result.wall_s = time.monotonic() - started
    finished.set()
    sampler.join()
    return result


def expected_ranking(query: Query, answer: dict) -> str | None:
    ids = [r["id"] for r in answer["results"]]
    if ids != query.expected_ids:
        return f"ranking {ids} differs from brute force {query.expected_ids}"
    return None


# --- the benchmark --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load_test",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n  python -m benchmarks.load_test\n"
        "  python -m benchmarks.load_test --duration 30 --max-requests 5000 "
        "--no-record",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="client threads (default: %(default)s)")
    parser.add_argument("--server-workers", type=int, default=1, help="gunicorn workers (default: %(default)s)")
    parser.add_argument("--server-threads", type=int, default=4, help="threads per worker (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=100, help="gallery images per colour (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="results per search (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append a row to {RESULTS.name}")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model, embeddings, labels = build_color_gallery(root, root / "colors", per_class=args.per_class)
        queries = queries_for(model, embeddings, labels, args.k)
        with running_server(
            [root / "colors"], workers=args.server_workers, threads=args.server_threads, log_dir=root
        ) as server:
            run_load(server, queries, threads=args.threads, duration_s=30, max_requests=20, k=args.k)  # warm-up
            result = run_load(
                server,
                queries,
                threads=args.threads,
                duration_s=args.duration,
                max_requests=args.max_requests,
                k=args.k,
            )
    first, last = result.rss_thirds_mib()
    print(
        f"{result.requests} requests in {result.wall_s:.1f} s ({result.requests_per_s:.1f}/s), "
        f"{len(result.errors)} errors, p50 {result.percentile_ms(50):.1f} ms, p99 {result.percentile_ms(99):.1f} ms, "
        f"server RSS {first:.1f} → {last:.1f} MiB (max {result.max_rss_mib:.1f})"
    )
    for error in result.errors[:10]:
        print("  " + error)
    if not args.no_record:
        row = [
            now_utc(),
            this_command("benchmarks.load_test"),
            machine(f"1-min load average {load:.1f} before"),
            f"sct serve, {args.server_workers} worker × {args.server_threads} threads; gallery "
            f"{len(labels):,} × 16-d (tiny model, 32 px)",
            str(args.threads),
            f"{result.requests:,}",
            str(len(result.errors)),
            f"{result.percentile_ms(50):.1f}",
            f"{result.percentile_ms(99):.1f}",
            f"{result.requests_per_s:.1f}",
            f"{first:.1f} → {last:.1f}",
            f"{result.max_rss_mib:.1f}",
        ]
        print(append_row(RESULTS, HEADER, row))
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
