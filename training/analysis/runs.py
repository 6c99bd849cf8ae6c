"""Read a run folder written by ``sct train``: settings, per-iteration metrics, evaluations, saved triplets.

Only files are read here (no torch), so a report can be drawn from runs copied
off a GPU machine without their checkpoints.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.errors import UserFileNotFoundError, UserValueError
from training import stall

TAIL_SHARE = 0.05  # "final" hard fraction: mean over the last 5% of iterations


@dataclass(frozen=True)
class TripletSnapshot:
    """The (S_ap, S_an) pairs of one batch, and where a run saved them, the same triplets one step later."""

    iteration: int
    epoch: int
    s_ap: np.ndarray
    s_an: np.ndarray
    s_ap_after: np.ndarray | None = None
    s_an_after: np.ndarray | None = None

    @property
    def hard(self) -> np.ndarray:
        return self.s_an > self.s_ap


@dataclass
class Stall:
    """A stretch the trainer flagged as stalled (training.stall): ``kind`` "stall" or "collapse", from iteration
    ``start`` to ``end``, or to the end of the log when ``end`` is None (still stalled when the run stopped)."""

    kind: str
    start: int
    end: int | None = None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def loss(self) -> str:
        return str(self.config.get("loss", "?"))

    @property
    def final_evaluation(self) -> dict[str, Any] | None:
        return self.evaluations[-1] if self.evaluations else None

    @property
    def final_hard_fraction(self) -> float | None:
        if not self.steps:
            return None
        tail = self.steps[-max(1, round(TAIL_SHARE * len(self.steps))) :]
        return float(np.mean([s["hard_fraction"] for s in tail]))

    @property
    def images_per_second(self) -> float | None:
        """Median over iterations (the first one of each epoch waits for the loader and is left out)."""
        rates = [s["images_per_s"] for s in self.steps if "images_per_s" in s]
        return float(statistics.median(rates[1:] or rates)) if rates else None

    def stalled_ranges(self) -> list[tuple[int, int]]:
        """(first, last) iteration of each stall, an unfinished one running to the last iteration logged."""
        last = self.steps[-1]["iter"] if self.steps else 0
        return [(s.start, s.end if s.end is not None else max(last, s.start)) for s in self.stalls]

    def triplet_iterations(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.path / "triplets").glob("iter_*.npz"))

    def triplets(self, iteration: int) -> TripletSnapshot:
        path = self.path / "triplets" / f"iter_{iteration:07d}.npz"
        if not path.is_file():
            saved = self.triplet_iterations()
            raise UserFileNotFoundError(
                f"{self.path}: no triplets saved at iteration {iteration}; saved: " f"{_describe_iterations(saved)}"
            )
        with np.load(path) as data:
            after = ("s_ap_after" in data.files) and ("s_an_after" in data.files)
            return TripletSnapshot(
                iteration=int(data["iteration"]),
                epoch=int(data["epoch"]),
                s_ap=data["s_ap"].astype(np.float64),
                s_an=data["s_an"].astype(np.float64),
                s_ap_after=data["s_ap_after"].astype(np.float64) if after else None,
                s_an_after=data["s_an_after"].astype(np.float64) if after else None,
            )


def load_run(path: str | Path) -> Run:
    """The run in folder ``path``; a folder that is not a run gets an error naming the missing file."""
    path = Path(path)
    if not path.is_dir():
        raise UserFileNotFoundError(f"run folder {path} does not exist")
    config_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    for required in (config_file, metrics_file):
        if not required.is_file():
            raise UserFileNotFoundError(
                f"{path} is not a training run: {required.name} is missing "
                "(sct train writes config.yaml and metrics.jsonl into its --out folder)"
            )
    config = yaml.safe_load(config_file.read_text()) or {}
    run = Run(path=path, config=config)
    for number, line in enumerate(metrics_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserValueError(f"{metrics_file}:{number}: not a JSON line ({error.msg})") from None
        kind = entry.get("type")
        if kind == "eval":
            run.evaluations.append(entry)
        elif kind == stall.START:
            run.stalls.append(Stall(entry["kind"], entry["start_iter"]))
        elif kind == stall.END and run.stalls:
            run.stalls[-1].end = entry["iter"]
        elif kind is None:  # one training iteration; other typed lines (e.g. "htl_tree") are not steps
            run.steps.append(entry)
    return run


def pick_iterations(saved: list[int], wanted: list[int] | None, count: int = 4) -> list[int]:
    """``wanted`` snapped to the nearest saved iteration, or ``count`` saved ones spread from first to last."""
    if not saved:
        return []
    if wanted:
        return sorted({min(saved, key=lambda s: abs(s - w)) for w in wanted})
    if len(saved) <= count:
        return saved
    positions = np.linspace(0, len(saved) - 1, count).round().astype(int)
    return sorted({saved[p] for p in positions})


def _describe_iterations(saved: list[int]) -> str:
    if not saved:
        return "none"
    return ", ".join(map(str, saved[:6])) + (f" … {saved[-1]}" if len(saved) > 6 else "")
