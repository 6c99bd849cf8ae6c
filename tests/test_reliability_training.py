"""Training faults (issue 9): ``python -m sct train`` killed with SIGKILL in the middle of an epoch, after its
first checkpoint, then run again with ``--resume``, logs exactly the metrics of an uninterrupted run with the
same seed: the loss, the hard-triplet fraction and the similarities of every later iteration, and every
evaluation, to 1e-5.

Both runs are real processes of the console script on a tiny synthetic folder dataset (resnet18, 16 px, CPU,
fp32, random crops and flips). tests/test_training_trainer.py tests the same in one process, with an
exception instead of a kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training_trainer import _images

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, ITERS_PER_EPOCH = 3, 8  # 8 classes × 8 images: 4 training classes, 32 images, batches of 4
#: Values that depend on the computation only (not images_per_s, seconds).
COMPARED = (
    "loss",
    "hard_fraction",
    "mean_s_ap",
    "mean_s_an",
    "lr",
    "recall@1",
    "recall@2",
    "map@r",
    "precision@1",
    "mean_similarity",
    "queries",
    "skipped",
)


def write_dataset(root: Path) -> Path:
    return _images(root, classes=8, per_class=8)


def start_training(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "sct",
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--pretrained",
        "none",
        "--dim",
        "8",
        "--image-size",
        "16",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "4",
        "--images-per-class",
        "2",
        "--lr",
        "0.05",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--eval-every",
        "1",
        "--seed",
        "7",
        "--no-progress",
        *extra,
    ]
    out.mkdir(parents=True, exist_ok=True)
    log = (out.parent / f"{out.name}{'-resume' if '--resume' in extra else ''}.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def metrics(run: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (a killed writer may leave a partial last line)."""
    lines = (run / "metrics.jsonl").read_text().split("\n")[:-1] if (run / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def training_lines(entries: list[dict], epoch: int) -> list[dict]:
    return [e for e in entries if e.get("type") is None and e.get("epoch") == epoch]


def kill_in_second_epoch(process: subprocess.Popen, run: Path, timeout_s: float = 120) -> list[dict]:
    """SIGKILL once last.pt exists and the second epoch has logged two iterations; returns the log at the kill."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended (status {process.returncode}) before it could be killed")
        entries = metrics(run)
        if (run / "last.pt").exists() and len(training_lines(entries, 1)) >= 2:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return metrics(run)
        time.sleep(0.005)
    process.kill()
    pytest.fail("the second epoch did not start in time")


def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(tmp_path):
    data = write_dataset(tmp_path / "data")
    whole = start_training(data, tmp_path / "whole")
    broken = start_training(data, tmp_path / "broken")
    try:
        at_kill = kill_in_second_epoch(broken, tmp_path / "broken")
    finally:
        broken.kill()
    assert broken.returncode == -signal.SIGKILL
    second_epoch = training_lines(at_kill, 1)
    assert 2 <= len(second_epoch) < ITERS_PER_EPOCH, "the kill must land inside the second epoch"
    assert not training_lines(at_kill, 2)

    resumed = start_training(data, tmp_path / "broken", "--resume")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "broken-resume.log").read_text()[-3000:]
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    log = (tmp_path / "broken-resume.log").read_text()
    assert f"resumed from {tmp_path / 'broken' / 'last.pt'} after epoch 1 (iteration {ITERS_PER_EPOCH})" in log

    expected, got = metrics(tmp_path / "whole"), metrics(tmp_path / "broken")
    assert len(training_lines(expected, EPOCHS - 1)) == ITERS_PER_EPOCH
    assert [(e.get("type"), e["iter"]) for e in got] == [(e.get("type"), e["iter"]) for e in expected]
    compared = 0
    for a, b in zip(expected, got):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a, b)
                compared += a["iter"] >= ITERS_PER_EPOCH  # after the checkpoint the kill fell behind
    assert compared > 50
