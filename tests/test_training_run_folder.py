"""The run folder (training/run_folder.py) on its own: what rank 0 writes and the others do not, checkpoints
(last.pt every epoch, best.pt on a better recall, never half-written), resume reading back, metrics truncation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import load_config_file, resolve_config
from training.run_folder import RunFolder, truncate_metrics


def _config(out: Path):
    return resolve_config("folder", "data", str(out), overrides=dict(dim=8, epochs=3, device="cpu"))


def _state(epoch: int, best_recall: float, weight: float = 0.0) -> dict:
    return {
        "model": {"w": torch.full((2,), weight)},
        "epoch": epoch,
        "iteration": 4 * (epoch + 1),
        "best_recall": best_recall,
        "config": {"dim": 8},
        "recall@1": None,
    }


def _snapshot() -> dict[str, np.ndarray]:
    return {
        "s_ap": np.array([0.5, 0.25], np.float32),
        "s_an": np.array([0.75, 0.0], np.float32),
        "triplets": np.array([[0, 1, 2], [1, 0, 3]]),
        "s_ap_after": np.array([0.625, 0.25], np.float32),
        "s_an_after": np.array([0.5, 0.125], np.float32),
    }


def test_create_writes_the_folder_config_and_an_empty_log(tmp_path: Path) -> None:
    config = _config(tmp_path / "run" / "nested")
    run = RunFolder(config.out)
    assert not run.path.exists()  # nothing until asked
    run.create(config)
    run.start_metrics()
    assert (run.path / "triplets").is_dir() and run.metrics_path.read_text() == ""
    assert load_config_file(run.path / "config.yaml") == config
    run.log({"iter": 0, "loss": 1.5})
    run.log({"type": "eval", "iter": 1, "recall@1": 0.25})
    assert [json.loads(line) for line in run.metrics_path.read_text().splitlines()] == [
        {"iter": 0, "loss": 1.5},
        {"type": "eval", "iter": 1, "recall@1": 0.25},
    ]
    run.start_metrics()  # a fresh run in the same folder starts a fresh log
    assert run.metrics_path.read_text() == ""


def test_a_folder_that_does_not_write_writes_nothing(tmp_path: Path) -> None:
    """The other processes under torchrun: every write is skipped, and resuming keeps no lines for them."""
    config = _config(tmp_path / "run")
    silent = RunFolder(config.out, writes=False)
    silent.create(config)
    assert not silent.path.exists()
    silent.path.mkdir()
    silent.start_metrics()
    silent.log({"iter": 0})
    assert silent.save_checkpoint(_state(0, -1.0), 0.5) == -1.0
    silent.save_triplets(0, 0, _snapshot())
    assert list(silent.path.iterdir()) == []
    (silent.path / "metrics.jsonl").write_text('{"iter": 0}\n{"iter": 5}\n')
    assert silent.truncate_metrics(1) == [] and silent.metrics_path.read_text() == '{"iter": 0}\n{"iter": 5}\n'


def test_last_pt_every_epoch_and_best_pt_on_a_better_recall(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    best = run.save_checkpoint(_state(0, -1.0, weight=0), None)  # no evaluation and no best.pt yet: it is written
    assert best == -1.0 and torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 0
    best = run.save_checkpoint(_state(1, best, weight=1), 0.5)
    assert best == 0.5
    best = run.save_checkpoint(_state(2, best, weight=2), 0.25)  # worse: best.pt stays epoch 1's
    assert best == 0.5
    best = run.save_checkpoint(_state(3, best, weight=3), None)  # not evaluated: best.pt stays too
    assert best == 0.5
    last, kept = (torch.load(tmp_path / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert last["epoch"] == 3 and torch.equal(last["model"]["w"], torch.full((2,), 3.0))
    assert kept["epoch"] == 1 and kept["best_recall"] == 0.5 and torch.equal(kept["model"]["w"], torch.ones(2))
    assert list(kept) == list(_state(1, 0.5))  # the same keys, in the same order, as the state given


def test_last_pt_carries_the_best_recall_so_far_so_that_a_resumed_run_keeps_the_best_pt(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.save_checkpoint(_state(0, 0.25), 0.75)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["best_recall"] == 0.75
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best_recall"] == 0.75
    resumed = run.load_checkpoint(torch.device("cpu"))  # --resume reads last.pt
    assert run.save_checkpoint(_state(1, resumed["best_recall"], weight=1), 0.5) == 0.75  # worse than epoch 0
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 0
    run.save_checkpoint(_state(2, 0.75, weight=2), 0.5)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["best_recall"] == 0.75  # not lowered either


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """The state is serialised before anything is written, then written under a hidden name and renamed: a
    failure leaves last.pt as it was, and no other file behind."""
    run = RunFolder(tmp_path)
    run.save_checkpoint(_state(0, -1.0, weight=7), 0.5)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    broken = {**_state(1, 0.5), "unpicklable": lambda: None}
    with pytest.raises(Exception):
        run.save_checkpoint(broken, 0.75)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    (tmp_path / "best.pt").unlink()
    (tmp_path / "best.pt").mkdir()  # best.pt cannot be replaced: last.pt is new, and nothing half-written is left
    (tmp_path / "best.pt" / "keep").write_text("x")
    with pytest.raises(OSError):
        run.save_checkpoint(_state(1, 0.5, weight=8), 0.75)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_load_checkpoint_reads_back_what_was_saved_and_names_what_is_missing(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="--resume: .*last.pt does not exist; start without --resume"):
        run.load_checkpoint(torch.device("cpu"))
    run.save_checkpoint(_state(2, 0.5, weight=3), 0.25)
    state = run.load_checkpoint(torch.device("cpu"))
    assert state["epoch"] == 2 and state["iteration"] == 12 and state["best_recall"] == 0.5
    assert torch.equal(state["model"]["w"], torch.full((2,), 3.0))


def test_truncation_keeps_what_the_checkpoint_had_seen(tmp_path: Path) -> None:
    """Checkpoint at iteration 3: steps 0–2 and the evaluation after them stay; the next epoch's class tree
    (logged at iteration 3), its steps and a stall its step 4 showed go, as does a line cut short."""
    lines = [
        {"iter": 0},
        {"iter": 1},
        {"type": "stall_start", "iter": 2},
        {"iter": 2},
        {"type": "eval", "iter": 3, "recall@1": 0.5},
        {"type": "htl_tree", "iter": 3},
        {"iter": 3},
        {"iter": 4},
        {"type": "stall_end", "iter": 4},
        {"type": "eval", "iter": 5},
    ]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"iter": 5, "lo')
    kept = RunFolder(tmp_path).truncate_metrics(3)
    assert kept == lines[:5]
    assert [json.loads(line) for line in log.read_text().splitlines()] == lines[:5]
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == [] and not (tmp_path / "absent.jsonl").exists()


def test_triplet_snapshots_are_named_by_iteration(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.create(_config(tmp_path))
    run.save_triplets(12, 3, _snapshot())
    saved = np.load(tmp_path / "triplets" / "iter_0000012.npz")
    assert saved.files == ["s_ap", "s_an", "triplets", "s_ap_after", "s_an_after", "iteration", "epoch"]
    for key, value in _snapshot().items():
        assert np.array_equal(saved[key], value), key
    assert int(saved["iteration"]) == 12 and int(saved["epoch"]) == 3
    assert [p.name for p in (tmp_path / "triplets").iterdir()] == ["iter_0000012.npz"]
