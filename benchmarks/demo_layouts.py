"""The demo's trunk layouts: feature grid (heatmap cells) against Recall@1 and training time.

A ResNet's feature grid is the crop size over its output stride: 32 for the whole
network, so the demo's 32 px crops give one cell, and a similarity heatmap shows
nothing. Each layout below changes the stride (``--trunk-stages``,
``--last-stride``) or the crop size (``--image-size``). For each one this
script

1. times one training step (forward, backward, AdamW) on a batch of the demo's
   size, every layout in turn, several rounds, and takes the median: a ratio to
   the demo's old layout measured in the same run, which noise on a shared
   machine spoils less than wall-clock time;
2. unless ``--steps-only``, runs the demo as a user would (`sct train` with the
   Fashion-MNIST CPU preset and the layout's flags, `sct export`, `sct index`
   of the 10,000 test images, `sct eval`), wall-clock timed;

and appends one row per layout to benchmarks/results/demo_layouts.md.

    python -m benchmarks.demo_layouts                          # every layout (about 40 minutes on 2 cores)
    python -m benchmarks.demo_layouts --layouts stride8 --steps-only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.recording import append_row, machine, now_utc, this_command
from sct.demo import heatmap_grid_side
from training.model import EmbeddingNet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo_layouts.md"
HEADER = """\
# Demo trunk layouts: feature grid against Recall@1 and training time

Fashion-MNIST, ResNet-18 from scratch, the CPU preset of `sct demo` (3 epochs × 450 batches of 120);
Recall@1 leave-one-out on the 10,000 test images. "step ms" is the median of timed training steps
(forward, backward, AdamW; batch 120), every layout in turn in the same run; "× old" divides it by the
old demo layout's (4 stages, stride 2, 32 px) from that run.

| date (UTC) | command | machine | layout | flags | grid | step ms | × old | training s | Recall@1 | MAP@R |
|---|---|---|---|---|---|---|---|---|---|---|
"""

#: name → (flags for sct train, trunk stages, last stride, image size)
LAYOUTS: dict[str, tuple[list[str], int, int, int]] = {
    "old": (["--trunk-stages", "4", "--last-stride", "2"], 4, 2, 32),
    "stride8": (["--trunk-stages", "3", "--last-stride", "1"], 3, 1, 32),
    "stride8-2stages": (["--trunk-stages", "2", "--last-stride", "2"], 2, 2, 32),
    "stride8-28px": (["--trunk-stages", "3", "--last-stride", "1", "--image-size", "28"], 3, 1, 28),
    "stride16-64px": (["--trunk-stages", "4", "--last-stride", "1", "--image-size", "64"], 4, 1, 64),
    "stride32-128px": (["--trunk-stages", "4", "--last-stride", "2", "--image-size", "128"], 4, 2, 128),
}
BATCH = 120


def step_milliseconds(names: list[str], rounds: int, steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median ms of one training step per layout, the layouts interleaved round by round; and the side of each
    layout's feature grid at its crop size."""
    torch.manual_seed(0)
    setups = {}
    for name in names:
        _, stages, stride, size = LAYOUTS[name]
        model = EmbeddingNet("resnet18", 128, True, trunk_stages=stages, last_stride=stride).train()
        setups[name] = (model, torch.optim.AdamW(model.parameters()), torch.randn(BATCH, 3, size, size))
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for name, (model, optimizer, images) in setups.items():
            for _ in range(steps):
                started = time.perf_counter()
                loss = model(images).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    sides = {}
    for name, (model, _, images) in setups.items():
        with torch.no_grad():
            _, projected = model.eval().embed_with_map(images[:1])
        sides[name] = math.isqrt(projected.shape[1])
    return {name: 1000 * statistics.median(values) for name, values in times.items()}, sides


def run_demo(name: str, data_root: str, scratch: Path) -> dict[str, float]:
    """Train, export, index and evaluate one layout as `sct demo` does; returns its figures."""
    flags = LAYOUTS[name][0]
    run, index = scratch / name, scratch / f"{name}-index"
    sct = [sys.executable, "-m", "sct"]
    started = time.perf_counter()
    subprocess.run(
        [*sct, "train", "--dataset", "fashion-mnist", "--data-root", data_root, "--out", str(run), *flags],
        cwd=ROOT,
        check=True,
    )
    trained = time.perf_counter() - started
    model = run / "model.onnx"
    subprocess.run([*sct, "export", "--checkpoint", str(run / "best.pt"), "--out", str(model)], cwd=ROOT, check=True)
    subprocess.run(
        [*sct, "index", "--model", str(model), "--dataset", "fashion-mnist", "--data-root", data_root]
        + ["--split", "test", "--out", str(index)],
        cwd=ROOT,
        check=True,
    )
    subprocess.run([*sct, "eval", "--index", str(index), "--k", "1"], cwd=ROOT, check=True)
    results = json.loads((index / "eval.json").read_text())
    return {
        "train_s": trained,
        "recall@1": results["recall@1"],
        "map@r": results["map@r"],
        "grid": heatmap_grid_side(str(model)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_layouts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--train", nargs="+", choices=list(LAYOUTS), help="layouts to train (default: all chosen)")
    parser.add_argument("--steps-only", action="store_true", help="time the training steps, train nothing")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of timed steps (default: %(default)s)")
    parser.add_argument("--data-root", default=str(ROOT / "data" / "fashion-mnist"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    names = list(dict.fromkeys(["old", *args.layouts]))  # the ratio's baseline is always timed
    step_ms, sides = step_milliseconds(names, args.rounds, steps=3)
    trained = [] if args.steps_only else [name for name in (args.train or args.layouts) if name in names]
    with tempfile.TemporaryDirectory() as scratch:
        figures = {name: run_demo(name, args.data_root, Path(scratch)) for name in trained}
    for name in args.layouts:
        flags = LAYOUTS[name][0]
        side = figures[name]["grid"] if name in figures else sides[name]
        row = [
            now_utc(),
            this_command("benchmarks.demo_layouts"),
            machine(),
            name,
            f"`{' '.join(flags)}`",
            f"{side}×{side}",
            f"{step_ms[name]:.0f}",
            f"{step_ms[name] / step_ms['old']:.2f}",
            *(
                [f"{figures[name]['train_s']:.0f}", f"{figures[name]['recall@1']:.4f}", f"{figures[name]['map@r']:.4f}"]
                if name in figures
                else ["not trained"] * 3
            ),
        ]
        print(row if args.no_record else append_row(RESULTS, HEADER, row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
