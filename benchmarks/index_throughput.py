"""Indexing throughput on this machine: `sct index`'s ONNX embedder vs torch on the same images.

Exports a ResNet (random weights; speed does not depend on them) through the
product's `sct export` path, writes synthetic JPEGs, then times
`OnnxEmbedder.embed_paths` (decode + preprocess + ONNX Runtime) against torch
fp32 inference on the same preprocessed batches, in the same run. Also the
batch-1 latency of ONNX Runtime (target: about 33 ms for ResNet-50 on 2
cores). One row is appended to benchmarks/results/index_throughput.md.

    python -m benchmarks.index_throughput                  # ResNet-50, 256 px, 256 images
    python -m benchmarks.index_throughput --arch resnet18 --images 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.recording import append_row, machine, now_utc, this_command
from catalog import load_rgb
from retrieval.embedder import OnnxEmbedder
from retrieval.preprocessing import preprocess_batch
from training.config import resolve_config
from training.export import export_onnx
from training.model import EmbeddingNet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "index_throughput.md"
HEADER = """\
# Indexing throughput on CPU: ONNX Runtime embedder vs torch, same images, same run

"embedder" = `OnnxEmbedder.embed_paths` (JPEG decode + preprocessing + ONNX Runtime), what `sct index` runs;
"torch" = the same model's fp32 forward on the already preprocessed batches (model time only).

| date (UTC) | command | machine | arch | px | batch | images | embedder img/s | torch img/s | ratio | ORT batch-1 ms (median) |
|---|---|---|---|---|---|---|---|---|---|---|
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.index_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = resolve_config(
            "folder",
            "unused",
            str(scratch),
            overrides=dict(arch=args.arch, dim=args.dim, image_size=args.image_size, pretrained="none"),
        )
        torch.manual_seed(0)
        model = EmbeddingNet(args.arch, args.dim, config.embedding_bn).eval()
        torch.save({"model": model.state_dict(), "config": config.to_dict()}, scratch / "best.pt")
        export_onnx(scratch / "best.pt", scratch / "model.onnx")
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            paths.append(scratch / f"{i}.jpg")
            pixels = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(paths[-1], quality=90)
        embedder = OnnxEmbedder(scratch / "model.onnx")
        embedder.embed_paths(paths[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
        started = time.perf_counter()
        embedder.embed_paths(paths, batch_size=args.batch_size, progress=False)
        embedder_rate = args.images / (time.perf_counter() - started)

        batches = [
            torch.from_numpy(
                preprocess_batch([load_rgb(p) for p in paths[i : i + args.batch_size]], embedder.preprocessing)
            )
            for i in range(0, args.images, args.batch_size)
        ]
        with torch.no_grad():
            model(batches[0])  # warm-up
            started = time.perf_counter()
            for batch in batches:
                model(batch)
        torch_rate = args.images / (time.perf_counter() - started)

        single = batches[0][:1].numpy()
        latencies = []
        for _ in range(25):
            started = time.perf_counter()
            embedder.session.run(["embedding"], {"image": single})
            latencies.append(time.perf_counter() - started)
        batch1_ms = 1000 * statistics.median(latencies[5:])
    print(
        f"embedder {embedder_rate:.1f} img/s, torch {torch_rate:.1f} img/s, ORT batch-1 {batch1_ms:.1f} ms",
        file=sys.stderr,
    )
    row = [
        now_utc(),
        this_command("benchmarks.index_throughput"),
        machine(),
        args.arch,
        str(args.image_size),
        str(args.batch_size),
        str(args.images),
        f"{embedder_rate:.1f}",
        f"{torch_rate:.1f}",
        f"{embedder_rate / torch_rate:.2f}",
        f"{batch1_ms:.1f}",
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
