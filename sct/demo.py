"""``sct demo``: the whole pipeline on Fashion-MNIST, run as the user would run each command."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from retrieval.cli_options import add_device

EPILOG = """\
Examples:
  sct demo                         train, export, index, evaluate, then serve on http://127.0.0.1:5000
  sct demo --no-serve              everything but the server
  sct demo --epochs 12 --no-serve  a longer run (about 0.90+ Recall@1; see README)
  sct demo --port 8080

Steps, each an ordinary sct command (printed as it runs):
  1. sct train  on the 60,000 training images (the first two stages of a ResNet-18 at 32 px, so that
                similarity heatmaps have 4×4 cells; on CPU, or CUDA when present)
  2. sct export to ONNX
  3. sct index  the 10,000 test images as the gallery
  4. sct eval   leave-one-out Recall@K on that gallery
  5. sct serve  the search page
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on Fashion-MNIST and serve it",
        epilog=EPILOG,
        description="Train → export → index → evaluate → serve on Fashion-MNIST (read from the Debian package "
        "dataset-fashion-mnist, or downloaded by torchvision when online).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-root", default="data/fashion-mnist", help="where the demo images go (default: %(default)s)"
    )
    parser.add_argument("--run", default="runs/fashion-mnist", help="run folder (default: %(default)s)")
    parser.add_argument("--index-out", default="index_data/fashion-mnist", help="gallery folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 3 on CPU)")
    parser.add_argument("--augment", action="store_true", help="train with random crops and flips (for longer runs)")
    add_device(parser, default="auto")
    parser.add_argument("--no-serve", action="store_true", help="stop after the evaluation")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from sct.cli import main

    model = f"{args.run}/model.onnx"
    train = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-root",
        args.data_root,
        "--out",
        args.run,
        "--device",
        args.device,
    ]
    if args.epochs:
        train += ["--epochs", str(args.epochs)]
    if args.augment:
        train += ["--augment"]
    steps = [
        train,
        ["export", "--checkpoint", f"{args.run}/best.pt", "--out", model],
        [
            "index",
            "--model",
            model,
            "--dataset",
            "fashion-mnist",
            "--data-root",
            args.data_root,
            "--split",
            "test",
            "--out",
            args.index_out,
        ],
        ["eval", "--index", args.index_out, "--k", "1", "2", "4", "8"],
    ]
    timings = {}
    for step in steps:
        print(f"\n$ sct {' '.join(step)}", flush=True)
        started = time.perf_counter()
        status = main(step)
        timings[step[0]] = time.perf_counter() - started
        if status:
            print(f"demo stopped: `sct {step[0]}` failed")
            return status
    _summary(args, timings)
    if args.no_serve:
        return 0
    print(f"\n$ sct serve --index {args.index_out} --host {args.host} --port {args.port}")
    return main(["serve", "--index", args.index_out, "--host", args.host, "--port", str(args.port)])


def _summary(args: argparse.Namespace, timings: dict[str, float]) -> None:
    """Print the learned and raw-pixel Recall@1 and the times; also saved as RUN/demo.json."""
    from catalog.fashion_mnist import load_arrays
    from core.atomic import atomic_write_text
    from retrieval.baselines import raw_pixel_embeddings
    from retrieval.metrics import evaluate

    learned = json.loads((Path(args.index_out) / "eval.json").read_text())
    side = heatmap_grid_side(f"{args.run}/model.onnx")
    images, labels = load_arrays(args.data_root)["test"]
    raw = evaluate(raw_pixel_embeddings(images), labels, ks=(1,))
    summary = {
        "recall@1": learned["recall@1"],
        "raw_pixel_recall@1": raw["recall@1"],
        "queries": learned["queries"],
        "heatmap_grid": [side, side],
        "seconds": timings,
    }
    atomic_write_text(Path(args.run) / "demo.json", json.dumps(summary, indent=2))
    others = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items() if step != "train")
    print("\nDemo summary")
    print(f"  training took        {timings['train']:.0f} s  ({others})")
    print(f"  Recall@1, learned    {learned['recall@1']:.4f}  (leave-one-out over {learned['queries']:,} test images)")
    print(f"  Recall@1, raw pixels {raw['recall@1']:.4f}  (cosine kNN on the same gallery)")
    print(f"  heatmap grid         {side}×{side} cells  (the pair view of any result shows which cells match)")


def heatmap_grid_side(model: str) -> int:
    """The side of the feature grid that an exported model gives at its own crop size."""
    import numpy as np

    from retrieval.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(model)
    size = embedder.preprocessing.image_size
    _, maps = embedder.embed_pixels_with_maps(np.zeros((1, 3, size, size), np.float32))
    return math.isqrt(maps.shape[1])
