"""Latency of ``POST /api/search`` on a 100,000-item gallery, split into its stages.

Target: on 2 CPU cores, decode + search + response should take at most
20% of the embedding time; report p50 and p99.

A ResNet-50 (random weights; speed does not depend on them) is exported
through the product's `sct export` path in a child process, so that the
measured process, like a server, never loads torch. The gallery holds random
unit vectors (their items point at a few real JPEG files), built by
`build_gallery`. Queries are 640×480 JPEGs sent one at a time through the
app's WSGI interface (Flask's test client: the server's code without the
network). The stages are the server's own timings of each response:
decode (upload → RGB), embed (preprocessing + ONNX Runtime, the feature map
included), search (FAISS) and render (keeping the query for heatmaps and
building the results). Then a bare FAISS search right after an embedding is
timed with all OpenMP threads and with one. One row is appended to
benchmarks/results/search_latency.md.

    python -m benchmarks.search_latency                                # ResNet-50, 512-d, 100,000 items, flat
    python -m benchmarks.search_latency --index-type ivf-flat --nlist 256
    python -m benchmarks.search_latency --arch resnet18 --items 10000 --requests 50 --no-record   # a smoke run
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import faiss
import numpy as np
from flask.testing import FlaskClient
from PIL import Image, ImageDraw

import catalog
from benchmarks.recording import append_row, machine, now_utc, this_command
from retrieval.gallery import INDEX_TYPES, Gallery, GalleryItem, build_gallery
from webapp import create_app

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "search_latency.md"
STAGES = ("decode", "embed", "search", "render")
HEADER = """\
# Search latency: POST /api/search, stage by stage

Target: decode + search + render ≤ 20% of embed, on 2 CPU cores, 100,000-item gallery.
Stages are the server's own timings of each response (`timings_ms`): decode (upload → RGB), embed
(preprocessing + ONNX Runtime), search (FAISS, one OpenMP thread per request), render (the query's crop
kept for heatmaps + the results). "request" is the whole call through the WSGI app (multipart parsing and
JSON included), one request at a time. Milliseconds, p50 / p99. The last column times a bare
`gallery.search` right after an embedding, with all OpenMP threads and with one: why the server uses one.

| date (UTC) | command | machine | model | gallery | requests | decode | embed | search | render | request | (decode + search + render) / embed, p50 / p99 | FAISS alone after an embedding, p50: all / 1 OpenMP thread |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def export_model(out: str, arch: str, dim: int, image_size: int) -> None:
    """Export a randomly initialised EmbeddingNet to ONNX (runs in a child process: torch stays out of this one)."""
    import torch

    from training.config import resolve_config
    from training.export import export_onnx
    from training.model import EmbeddingNet

    scratch = Path(out).parent
    config = resolve_config(
        "folder", "unused", str(scratch), overrides=dict(arch=arch, dim=dim, image_size=image_size, pretrained="none")
    )
    torch.manual_seed(0)
    torch.save(
        {"model": EmbeddingNet(arch, dim, config.embedding_bn).eval().state_dict(), "config": config.to_dict()},
        scratch / "best.pt",
    )
    export_onnx(scratch / "best.pt", out)


def photo_like_jpeg(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A JPEG with smooth gradients, shapes and mild noise: decodes like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * rng.uniform(0.2, 0.5) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 100)) % 256 for _ in range(3)], axis=-1
    )
    image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        box = (x0, y0, x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 200)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def time_requests(client: FlaskClient, queries: list[bytes], warmup: int, requests: int) -> dict[str, list[float]]:
    """Milliseconds of each stage (the response's timings_ms) and of the whole call, one request at a time."""
    stages: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "request")}
    for number in range(warmup + requests):
        data = queries[number % len(queries)]
        started = time.perf_counter()
        response = client.post("/api/search", data={"image": (io.BytesIO(data), "query.jpg")})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.get_data(as_text=True)
        if number >= warmup:
            timings = response.get_json()["timings_ms"]
            for stage in STAGES:
                stages[stage].append(timings[stage])
            stages["request"].append(1000 * elapsed)
    return stages


def faiss_thread_probe(gallery: Gallery, images: list[Image.Image], k: int, repeats: int = 40) -> tuple[float, float]:
    """p50 ms of one FAISS search right after an embedding (as in a request): all OpenMP threads, then one.

    With every core busy (ONNX Runtime's threads, other work), FAISS's OpenMP threads wait for each other
    even on a single query; the server searches with one thread (webapp.gallery_search).
    """
    results = []
    for threads in (faiss.omp_get_max_threads(), 1):
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        seconds = []
        for number in range(repeats):
            query, _ = gallery.embedder.embed_with_maps([images[number % len(images)]])
            started = time.perf_counter()
            gallery.search(query, k)
            seconds.append(time.perf_counter() - started)
        faiss.omp_set_num_threads(previous)
        results.append(1000 * float(np.median(seconds[5:])))
    return results[0], results[1]


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.search_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--items", type=int, default=100_000, help="gallery size (default: %(default)s)")
    parser.add_argument("--index-type", choices=INDEX_TYPES, default="flat")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: build_gallery's, about 4·√N)")
    parser.add_argument("--k", type=int, default=10, help="results per search (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests first (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the machine may be shared: say how busy it was

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model.onnx"
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            pool.submit(export_model, str(model), args.arch, args.dim, args.image_size).result()
        queries = [photo_like_jpeg(seed) for seed in range(8)]
        files = []
        for i, data in enumerate(queries):
            files.append(scratch / f"item{i}.jpg")
            files[-1].write_bytes(data)
        vectors = np.random.default_rng(0).standard_normal((args.items, args.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [GalleryItem(i, str(files[i % len(files)]), f"class {i % 1000}") for i in range(args.items)]
        started = time.perf_counter()
        build_gallery(
            scratch / "gallery",
            vectors,
            items,
            model,
            dataset="synthetic",
            split="test",
            index_type=args.index_type,
            nlist=args.nlist,
        )
        print(f"gallery of {args.items:,} built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        del vectors, items
        app = create_app([scratch / "gallery"], default_k=args.k)
        stages = time_requests(app.test_client(), queries, args.warmup, args.requests)
        gallery = app.extensions["sct"].indexes["gallery"].current()
        openmp = faiss_thread_probe(gallery, [catalog.decode_rgb(data) for data in queries], args.k)
        factory = gallery.manifest["faiss_factory"]

    p50 = {stage: percentiles(values)[0] for stage, values in stages.items()}
    p99 = {stage: percentiles(values)[1] for stage, values in stages.items()}
    overhead = [(d + s + r) / e for d, e, s, r in zip(*(stages[stage] for stage in STAGES))]
    ratio50, ratio99 = percentiles(overhead)
    for stage in stages:
        print(f"{stage:8s} p50 {p50[stage]:7.2f} ms  p99 {p99[stage]:7.2f} ms", file=sys.stderr)
    print(f"(decode + search + render) / embed: p50 {ratio50:.3f}, p99 {ratio99:.3f} (target ≤ 0.2)", file=sys.stderr)
    print(
        f"FAISS alone after an embedding, p50: {openmp[0]:.2f} ms with {faiss.omp_get_max_threads()} OpenMP "
        f"threads, {openmp[1]:.2f} ms with 1",
        file=sys.stderr,
    )
    row = [
        now_utc(),
        this_command("benchmarks.search_latency"),
        machine(f"1-min load average {load:.1f} before the run"),
        f"{args.arch} {args.image_size} px, {args.dim}-d",
        f"{args.items:,} × {args.dim}, {factory}",
        str(args.requests),
        *(f"{p50[s]:.2f} / {p99[s]:.2f}" for s in (*STAGES, "request")),
        f"{ratio50:.3f} / {ratio99:.3f}",
        f"{openmp[0]:.2f} / {openmp[1]:.2f}",
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
