"""The run folder (``config.out``): config.yaml, metrics.jsonl, checkpoints and triplet snapshots.

Every file a run leaves behind is written here, so that what a run folder holds, and how a resume reads it back,
can be tested without training. Under torchrun each process makes its own ``RunFolder``; only rank 0's
(``writes=True``) writes anything, and the others' writing methods do nothing, so the training loop does not
have to ask which rank it is before each write. Every process reads the checkpoint when resuming.

Checkpoints and snapshots are written atomically (``core.atomic``): a run killed while writing last.pt keeps
the previous one, which is what --resume starts from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import yaml

from core.atomic import atomic_write_bytes, atomic_write_text
from core.errors import UserFileNotFoundError
from training.config import TrainConfig

METRICS, LAST, BEST, CONFIG, TRIPLETS = "metrics.jsonl", "last.pt", "best.pt", "config.yaml", "triplets"


class RunFolder:
    """The files of one run under ``path``; ``writes`` is False on every process but rank 0."""

    def __init__(self, path: Path | str, *, writes: bool = True) -> None:
        self.path = Path(path)
        self.writes = writes
        self._metrics: TextIO | None = None  # metrics.jsonl, opened at the first line logged, kept open till close()

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def create(self, config: TrainConfig) -> None:
        """The folder, its triplets/ subfolder and config.yaml (rewritten on resume, as the settings may differ)."""
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / TRIPLETS).mkdir(exist_ok=True)
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def start_metrics(self) -> None:
        """An empty metrics.jsonl: a fresh run's log never continues an earlier run's in the same folder."""
        if self.writes:
            self.close()
            self.metrics_path.write_text("")

    def log(self, line: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl, in one write, so a killed process does not leave half a line
        behind (a full disk still can; ``truncate_metrics`` drops it). The file stays open between lines (opening
        it at every step costs a round trip on a network file system), line-buffered: each line reaches the file
        as it is logged, so a crash loses none."""
        if not self.writes:
            return
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)  # noqa: SIM115 - closed by close()
        self._metrics.write(json.dumps(line) + "\n")

    def close(self) -> None:
        """Close metrics.jsonl (the next line logged opens it again)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def save_checkpoint(self, state: dict[str, Any], recall: float | None) -> float:
        """Write ``state`` as last.pt, and as best.pt when ``recall`` beats ``state["best_recall"]``; returns the
        best recall after it, which both files carry. An epoch without an evaluation (``recall`` None) writes
        best.pt only when there is none yet, so a run that never evaluates still has one. last.pt carries this
        epoch's recall in its best when it is the best: a run resumed from it must not let a worse epoch replace
        best.pt."""
        best = state["best_recall"]
        if not self.writes:
            return best
        improved = recall is not None and recall > best
        if improved:
            best = recall
        state = {**state, "best_recall": best}
        atomic_write_bytes(self.path / LAST, serialise(state))
        if improved or (recall is None and not (self.path / BEST).exists()):
            atomic_write_bytes(self.path / BEST, serialise(state))
        return best

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """last.pt, read by every process with its tensors on ``device``; FileNotFoundError, saying what to do,
        when there is none."""
        path = self.path / LAST
        if not path.is_file():
            raise UserFileNotFoundError(f"--resume: {path} does not exist; start without --resume")
        return torch.load(path, map_location=device, weights_only=True)

    def truncate_metrics(self, iteration: int) -> list[dict[str, Any]]:
        """Resuming after the checkpoint at ``iteration``: drop the later lines of metrics.jsonl (see
        ``truncate_metrics``) and return those kept; nothing on the processes that do not write."""
        if not self.writes:
            return []
        self.close()  # the file is replaced: later lines go to the new one
        return truncate_metrics(self.metrics_path, iteration)

    def save_triplets(self, iteration: int, epoch: int, snapshot: dict[str, np.ndarray]) -> None:
        """triplets/iter_NNNNNNN.npz: ``snapshot``'s arrays (training.step_stats.triplet_snapshot), then the
        iteration and epoch."""
        if not self.writes:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **snapshot, iteration=iteration, epoch=epoch)
        atomic_write_bytes(self.path / TRIPLETS / f"iter_{iteration:07d}.npz", buffer.getvalue())


def serialise(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def truncate_metrics(path: Path, iteration: int) -> list[dict[str, Any]]:
    """Drop metric lines written after the checkpoint, so a resumed run's log reads like an unbroken one; returns
    the lines kept. An htl_tree line at the checkpoint's iteration belongs to the next epoch, which rebuilds it.
    A stall line carries the iteration whose step showed it, so it stays or goes with that step."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a full disk or a crash: it is after the checkpoint
            continue
    kept = [e for e in entries if (e["iter"] <= iteration if e.get("type") == "eval" else e["iter"] < iteration)]
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))
    return kept
