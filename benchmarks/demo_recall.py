"""The demo's Recall@1 and time against raw-pixel cosine kNN on the same Fashion-MNIST gallery.

Runs `sct demo --no-serve` as a user would (a subprocess, wall-clock timed),
then recomputes the raw-pixel baseline here, independently of the demo, and
appends one row to benchmarks/results/demo.md.

    python -m benchmarks.demo_recall                 # the default demo (about 5 minutes on 2 CPU cores)
    python -m benchmarks.demo_recall --epochs 12     # a longer run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.recording import append_row, machine, now_utc, this_command
from catalog.fashion_mnist import load_arrays

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo.md"
HEADER = """\
# Demo: Fashion-MNIST, 60,000 training images, 10,000-image gallery, leave-one-out

Raw pixels = cosine kNN on the 784 pixel values, computed here with an explicit numpy argmax.

| date (UTC) | command | machine | epochs | training s | whole demo s | Recall@1 learned | Recall@1 raw pixels |
|---|---|---|---|---|---|---|---|
"""


def raw_pixel_recall_at_1(images: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest neighbour by cosine of raw pixels, in blocks, self excluded by index."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    hits = 0
    for start in range(0, len(flat), 1000):
        block = flat[start : start + 1000] @ flat.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        hits += int((labels[block.argmax(axis=1)] == labels[start : start + 1000]).sum())
    return hits / len(flat)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, help="passed to sct demo (default: the demo's own)")
    parser.add_argument("--augment", action="store_true", help="passed to sct demo")
    parser.add_argument("--data-root", default=str(ROOT / "data" / "fashion-mnist"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run, index = Path(scratch) / "run", Path(scratch) / "index"
        command = [
            sys.executable,
            "-m",
            "sct",
            "demo",
            "--no-serve",
            "--data-root",
            args.data_root,
            "--run",
            str(run),
            "--index-out",
            str(index),
        ]
        if args.epochs:
            command += ["--epochs", str(args.epochs)]
        if args.augment:
            command += ["--augment"]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        total = time.perf_counter() - started
        summary = json.loads((run / "demo.json").read_text())
        epochs = yaml.safe_load((run / "config.yaml").read_text())["epochs"]
    images, labels = load_arrays(args.data_root)["test"]
    raw = raw_pixel_recall_at_1(images, labels)
    row = [
        now_utc(),
        this_command("benchmarks.demo_recall"),
        machine(),
        str(epochs),
        f"{summary['seconds']['train']:.0f}",
        f"{total:.0f}",
        f"{summary['recall@1']:.4f}",
        f"{raw:.4f}",
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
