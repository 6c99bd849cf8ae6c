"""Stall detection (training/stall.py): the rule on synthetic sequences, then a real SCT run that stalls."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_training_trainer import _metrics, kill_after_first_checkpoint_then_resume
from training.analysis.runs import Stall, load_run
from training.config import resolve_config
from training.stall import StallDetector, StallWatch, stall_window
from training.trainer import Trainer


def changes(hard: np.ndarray, s_ap: np.ndarray, s_an: np.ndarray, window: int) -> list[tuple[bool, str, int, int]]:
    """(started, kind, start iteration, iteration it was reported at) of every change the detector reports."""
    detector = StallDetector(window)
    reported = []
    for i, values in enumerate(zip(hard, s_ap, s_an)):
        change = detector.update(i, *map(float, values))
        if change is not None:
            reported.append((change.started, change.kind, change.start_iteration, change.window.last))
    return reported


def noisy(level: np.ndarray | float, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(level + rng.normal(0, sigma, n), -1, 1)


def test_the_window_is_a_tenth_of_the_run_between_20_and_50_iterations() -> None:
    assert [stall_window(n) for n in (5, 100, 300, 499, 10_000)] == [20, 20, 30, 49, 50]


def test_a_pinned_hard_fraction_with_flat_s_ap_fires_once_after_the_grace_period() -> None:
    """The reported stall: hard fraction 0.95–1.00 all run, S_ap ≈ 0.04 under S_an ≈ 0.31, batch noise. The first
    window is a grace period (every loss starts all-hard), so the first verdict is on iterations 50–99."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        n = 1000
        hard = np.clip(0.97 + rng.normal(0, 0.02, n), 0, 1)
        assert changes(hard, noisy(0.04, 0.05, n, rng), noisy(0.31, 0.05, n, rng), 50) == [(True, "stall", 50, 99)]


def test_a_stall_after_a_healthy_stretch_fires_when_the_window_is_mostly_stalled() -> None:
    """Healthy for 100 iterations (hard fraction 0.5), then pinned at 0.96 with S_ap dropping to 0.05: the window
    of 20 first averages above 0.9 once 18 of its iterations are pinned, at iteration 117."""
    n = 300
    hard = np.where(np.arange(n) < 100, 0.5, 0.96)
    s_ap = np.where(np.arange(n) < 100, 0.6, 0.05)
    assert changes(hard, s_ap, np.full(n, 0.3), 20) == [(True, "stall", 98, 117)]


def test_a_falling_hard_fraction_or_a_rising_s_ap_does_not_fire() -> None:
    rng = np.random.default_rng(0)
    n = 200
    learning = 0.2 + 0.77 * np.exp(-np.arange(n) / 15)  # from 0.97, as a run that learns from its first steps
    assert (
        changes(
            np.clip(learning + rng.normal(0, 0.03, n), 0, 1), noisy(0.3, 0.05, n, rng), noisy(0.3, 0.05, n, rng), 20
        )
        == []
    )
    climbing = np.linspace(0.05, 0.9, 100)  # pinned hard fraction, but the positives come closer every step
    assert changes(np.full(100, 0.97), noisy(climbing, 0.03, 100, rng), noisy(0.95, 0.03, 100, rng), 20) == []


@pytest.mark.parametrize("hard_level,sigma", [(0.9, 0.1), (0.96, 0.2)])
def test_noise_neither_restarts_a_stall_nor_ends_it(hard_level: float, sigma: float) -> None:
    """A hard fraction hovering at the 0.9 threshold, or a very noisy S_ap, over a long run: one warning, no end."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n = 3000
        hard = np.clip(hard_level + rng.normal(0, 0.05, n), 0, 1)
        reported = changes(hard, noisy(0.05, sigma, n, rng), noisy(0.3, sigma, n, rng), 50)
        assert len(reported) == 1 and reported[0][:2] == (True, "stall"), reported


def test_a_healthy_noisy_run_never_fires() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    assert (
        changes(np.clip(0.6 + rng.normal(0, 0.1, n), 0, 1), noisy(0.5, 0.1, n, rng), noisy(0.4, 0.1, n, rng), 50) == []
    )


def test_a_stall_ends_when_the_run_recovers_and_can_start_again() -> None:
    """Stalled from the start, reported once the grace period (the first window) is over. At iteration 100 S_ap
    climbs while the hard fraction stays pinned: the stall ends 9 iterations into the climb. At 140 the hard fraction drops (no event), and at 240 the run stalls again: a
    second warning once 18 of the window's 20 iterations are pinned, at 257."""
    s_ap = np.concatenate([np.full(100, 0.05), np.linspace(0.05, 0.8, 40), np.full(100, 0.8), np.full(100, 0.05)])
    hard = np.concatenate([np.full(140, 0.97), np.full(100, 0.3), np.full(100, 0.97)])
    assert changes(hard, s_ap, np.full(len(s_ap), 0.3), 20) == [
        (True, "stall", 20, 39),
        (False, "stall", 20, 108),
        (True, "stall", 238, 257),
    ]
    # a hard fraction that drops to 0.3 ends it once the window's mean is below 0.85: 4 iterations in
    hard = np.concatenate([np.full(100, 0.97), np.full(100, 0.3)])
    assert changes(hard, np.full(200, 0.05), np.full(200, 0.3), 20) == [
        (True, "stall", 20, 39),
        (False, "stall", 20, 103),
    ]


def test_the_collapse_variant_is_its_own_kind() -> None:
    """The stronger-optimiser case: hard fraction 0.98, S_ap 0.998 and S_an 0.9995, S_ap still creeping up."""
    rng = np.random.default_rng(0)
    n = 200
    s_ap = np.clip(np.linspace(0.96, 0.998, n) + rng.normal(0, 0.001, n), -1, 1)
    reported = changes(np.full(n, 0.98), s_ap, noisy(0.9995, 0.0003, n, rng), 20)
    assert reported == [(True, "collapse", 20, 39)]
    detector = StallDetector(20)
    change = [detector.update(i, 0.98, 0.998, 0.9995) for i in range(40)][-1]
    assert "collapsing" in change.message() and "--lr" in change.message()
    assert change.log_line(epoch=3) == {
        "type": "stall_start",
        "iter": 39,
        "epoch": 3,
        "kind": "collapse",
        "start_iter": 20,
        "window": 20,
        "hard_fraction": pytest.approx(0.98),
        "s_ap": pytest.approx(0.998),
        "s_an": pytest.approx(0.9995),
        "s_ap_rise": pytest.approx(0.0, abs=1e-9),
    }


def test_only_rank_zero_logs_and_prints_a_stall(capsys) -> None:
    logged = {0: [], 1: []}
    for rank in (1, 0):  # rank 1 first, then rank 0
        watch = StallWatch(StallDetector(20), logged[rank].append, active=rank == 0)
        for i in range(40):  # the grace period, then the window
            watch.step({"iter": i, "epoch": 0, "hard_fraction": 1.0, "mean_s_ap": 0.0, "mean_s_an": 0.3})
    assert logged[1] == [] and [line["type"] for line in logged[0]] == ["stall_start"]
    assert logged[0][0] == {
        "type": "stall_start",
        "iter": 39,
        "epoch": 0,
        "kind": "stall",
        "start_iter": 20,
        "window": 20,
        "hard_fraction": 1.0,
        "s_ap": 0.0,
        "s_an": pytest.approx(0.3),
        "s_ap_rise": 0.0,
    }
    assert capsys.readouterr().out.count("warning: training has stalled") == 1


def test_replaying_a_log_restores_the_watch_silently(capsys) -> None:
    """--resume replays the kept step lines (not the others) into a fresh watch: it reports nothing for them,
    and the next step is judged as in the unbroken run."""
    steps = [{"iter": i, "epoch": 0, "hard_fraction": 1.0, "mean_s_ap": 0.0, "mean_s_an": 0.3} for i in range(40)]
    unbroken, logged = [], []
    watch = StallWatch(StallDetector(20), unbroken.append)
    for step in steps:
        watch.step(step)
    capsys.readouterr()
    resumed = StallWatch(StallDetector(20), logged.append)
    resumed.replay(steps[:39] + [{"type": "eval", "iter": 39, "recall@1": 0.5}])
    assert logged == [] and capsys.readouterr().out == ""
    resumed.step(steps[39])
    assert logged == unbroken and capsys.readouterr().out.count("warning: training has stalled") == 1
    inactive = StallWatch(StallDetector(20), logged.append, active=False)
    inactive.replay(steps[:39])
    assert inactive.detector.update(39, 1.0, 0.0, 0.3) is None  # nothing was fed: still in its grace period


# ------------------------------------------------------------------ a real run that stalls
# SCT from scratch with the folder preset's recipe for a pretrained trunk (SGD, lr 0.009, λ 1) and no warm start,
# on 32 training classes of pure-noise images: nothing is shared within a class, so no step can pull positives in. With 16 classes × 2 images a
# batch, an anchor's easiest positive is one image against 30 negatives: nearly every triplet is hard.
# 4 iterations an epoch × 3 epochs; the window (and so the grace period before it) is cut from the rule's 20
# iterations to 5 to keep the run short: the stall is judged on iterations 5–9.
EPOCHS, CLASSES, PER_CLASS, WINDOW = 3, 64, 4, 5


def _noise_images(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c:02d}" / f"{i}.png")
    return root


def _stalling_config(data: Path, out: Path):
    return resolve_config(
        "folder",
        str(data),
        str(out),
        overrides=dict(
            arch="resnet18",
            pretrained="none",
            dim=8,
            image_size=16,
            epochs=EPOCHS,
            batch_size=32,
            images_per_class=2,
            augment=False,
            workers=0,
            device="cpu",
            precision="fp32",
            eval_every=0,
            triplets_every=0,
            seed=0,
            # the folder preset's recipe for a pretrained trunk and the paper's SCT, not the from-scratch defaults
            optimizer="sgd",
            lr=0.009,
            momentum=0.0,
            weight_decay=0.0,
            schedule="step",
            sct_warmup=0.0,
        ),
    )


@pytest.fixture(scope="module")
def stalled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("stall")
    data = _noise_images(root / "data")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = Trainer(_stalling_config(data, root / "run"), progress=False)
        shorten_the_window(trainer)
        run = trainer.fit()
    return data, run, printed.getvalue()


def shorten_the_window(trainer: Trainer) -> None:
    trainer.stall.detector = StallDetector(WINDOW)


def test_a_stalling_run_logs_the_stall_and_warns_once(stalled_run: tuple[Path, Path, str]) -> None:
    _, run, printed = stalled_run
    lines = _metrics(run)
    stalls = [line for line in lines if line.get("type", "").startswith("stall")]
    assert [(s["type"], s["kind"], s["start_iter"], s["iter"]) for s in stalls] == [
        ("stall_start", "stall", WINDOW, 2 * WINDOW - 1)
    ]
    steps = [line for line in lines if line.get("type") is None]
    assert len(steps) == EPOCHS * 4
    window = steps[WINDOW : 2 * WINDOW]  # the event reports the window's means, as logged per iteration
    assert stalls[0]["hard_fraction"] == pytest.approx(np.mean([s["hard_fraction"] for s in window]))
    assert stalls[0]["s_ap"] == pytest.approx(np.mean([s["mean_s_ap"] for s in window]))
    assert stalls[0]["hard_fraction"] > 0.9 and stalls[0]["s_ap"] < stalls[0]["s_an"]
    assert printed.count("warning: training has stalled") == 1
    warning = next(line for line in printed.splitlines() if "training has stalled" in line)
    assert f"iterations {WINDOW}–{2 * WINDOW - 1}" in warning and "--sct-warmup 1" in warning and "--lr" in warning
    assert load_run(run).stalls == [Stall("stall", WINDOW, None)] and len(load_run(run).steps) == len(steps)


def test_a_low_similarity_stall_does_not_also_warn_of_a_collapse(stalled_run: tuple[Path, Path, str]) -> None:
    _, run, printed = stalled_run
    evaluation = [line for line in _metrics(run) if line.get("type") == "eval"]
    assert evaluation and evaluation[-1]["mean_similarity"] < 0.95
    assert "training has stalled" in printed
    assert "collapsed" not in printed and "collapsing" not in printed


def test_a_run_resumed_before_the_stall_logs_it_as_an_unbroken_run_does(
    stalled_run: tuple[Path, Path, str], tmp_path: Path, capsys
) -> None:
    """Killed after epoch 1 (iteration 4), before the stall shows at iteration 9: the resumed run refills the
    detector's window from the logged iterations and reports the same stall at the same iteration."""
    data, whole, _ = stalled_run
    kill_after_first_checkpoint_then_resume(_stalling_config(data, tmp_path / "broken"), prepare=shorten_the_window)
    assert capsys.readouterr().out.count("warning: training has stalled") == 1
    expected, got = _metrics(whole), _metrics(tmp_path / "broken")
    assert [(e.get("type"), e["iter"]) for e in got] == [(e.get("type"), e["iter"]) for e in expected]
    for a, b in zip(expected, got):
        if a.get("type") == "stall_start":
            assert b == {
                key: pytest.approx(value, abs=1e-5) if isinstance(value, float) else value for key, value in a.items()
            }
