"""Train every loss from scratch, with the product's defaults, on many-class sets whose test classes are unseen.

For each set of benchmarks/zero_shot_sets.py, each loss and each seed this runs

    sct train --dataset folder --data-root SET --loss LOSS --pretrained none --seed SEED \\
              --arch resnet18 --dim 64 --image-size 64 --epochs 6 --batch-size 64 --device cpu

(no learning rate, optimiser or schedule: those are the defaults under test), and once per seed the untrained
network (`--lr 0 --epochs 1`: random weights, BatchNorm statistics from one pass over the training images). The
runs' final evaluations (Recall@K and MAP@R on the unseen test classes, with the metric code of `sct eval`) and
their stall events are collected into a JSON file and a Markdown table of mean ± std over the seeds.

Runs go `--jobs` at a time, each on one CPU thread; a run whose folder already holds a final evaluation is not run
again, so an interrupted study resumes where it stopped.

    python -m benchmarks.zero_shot_sets glyphs --per-class 60 --out data/glyphs
    python -m benchmarks.zero_shot_sets emoji --out data/emoji
    python -m benchmarks.zero_shot_study --set glyphs=data/glyphs --set emoji=data/emoji --out runs/zero-shot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.recording import machine, now_utc, this_command

LOSSES = ("hn", "shn", "sct", "ep", "htl")
UNTRAINED = "untrained"
COMMON = (
    "--dataset",
    "folder",
    "--pretrained",
    "none",
    "--arch",
    "resnet18",
    "--dim",
    "64",
    "--image-size",
    "64",
    "--epochs",
    "6",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--no-progress",
)
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def run_command(data: Path, out: Path, loss: str, seed: int, extra: Sequence[str]) -> list[str]:
    command = ["sct", "train", *COMMON, "--data-root", str(data), "--out", str(out)]
    command += ["--loss", "shn" if loss == UNTRAINED else loss, "--seed", str(seed)]
    if loss == UNTRAINED:  # the untrained network: one epoch at lr 0
        command += ["--lr", "0", "--epochs", "1"]
    return [*command, *extra]


def final_result(out: Path) -> dict | None:
    """The run's last evaluation, its stall events and its time, or None when it has not finished."""
    metrics = out / "metrics.jsonl"
    if not (out / "last.pt").is_file() or not metrics.is_file():
        return None
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [line for line in lines if line.get("type") == "eval"]
    if not evaluations:
        return None
    seconds = (out / "seconds.txt").read_text().strip() if (out / "seconds.txt").is_file() else "nan"
    events = [line["type"] for line in lines if line.get("type") in ("stall_start", "stall_end")]
    return {
        **{key: evaluations[-1][key] for key in METRICS},
        "stalls": events.count("stall_start"),
        "stalled_at_the_end": bool(events) and events[-1] == "stall_start",
        "hard_fraction_last": float(
            np.mean([line["hard_fraction"] for line in lines if line.get("type") is None][-20:] or [float("nan")])
        ),
        "seconds": float(seconds),
    }


def run_one(data: Path, out: Path, loss: str, seed: int, extra: Sequence[str]) -> dict:
    done = final_result(out)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", *run_command(data, out, loss, seed, extra)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            check=True,
        )
    (out / "seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    result = final_result(out)
    assert result is not None, f"{out}: the run wrote no evaluation"
    print(
        f"{out.name}: R@1 {result['recall@1']:.4f}  MAP@R {result['map@r']:.4f}  stalls {result['stalls']}  "
        f"{result['seconds']:.0f} s",
        flush=True,
    )
    return result


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    """Mean ± std over the seeds, one row per set and loss."""
    lines = [
        "| set | loss | seeds | "
        + " | ".join(m.replace("recall", "R").replace("map@r", "MAP@R") for m in METRICS)
        + " | runs with a stall (still stalled at the end) "
        "| s per run |",
        "|---|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    for name, by_loss in results.items():
        for loss, runs in by_loss.items():
            cells = [f"{np.mean([r[m] for r in runs]):.3f} ± {np.std([r[m] for r in runs]):.3f}" for m in METRICS]
            stalled = sum(r["stalls"] > 0 for r in runs)
            still = sum(r["stalled_at_the_end"] for r in runs)
            lines.append(
                f"| {name} | {loss} | {len(runs)} | "
                + " | ".join(cells)
                + f" | {stalled} of {len(runs)} ({still}) | {np.mean([r['seconds'] for r in runs]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot_study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m benchmarks.zero_shot_study --set glyphs=data/glyphs --set emoji=data/emoji "
        "--out runs/zero-shot",
    )
    parser.add_argument(
        "--set",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a set built by benchmarks/zero_shot_sets.py (repeat for several)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).parent / "results" / "zero_shot.md",
        help="Markdown file to append the table to",
    )
    parser.add_argument("extra", nargs="*", help="after --: more `sct train` arguments for every trained run")
    args = parser.parse_args(argv)
    sets = dict(item.split("=", 1) for item in args.set)
    jobs = [(name, loss, seed) for name in sets for seed in args.seeds for loss in [UNTRAINED, *args.losses]]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            job: pool.submit(
                run_one,
                Path(sets[job[0]]),
                args.out / job[0] / f"{job[1]}-seed{job[2]}",
                job[1],
                job[2],
                [] if job[1] == UNTRAINED else args.extra,
            )
            for job in jobs
        }
        results: dict[str, dict[str, list[dict]]] = {}
        for (name, loss, seed), future in futures.items():
            results.setdefault(name, {}).setdefault(loss, []).append({"seed": seed, **future.result()})
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a", encoding="utf-8") as file:
        file.write(
            f"\n## {now_utc()} UTC: {this_command('benchmarks.zero_shot_study')}\n\n" f"Machine: {machine()}.\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
