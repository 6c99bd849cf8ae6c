"""SCT trained from scratch with the default settings does not stall on a small many-class set, where the
paper's SCT with the pretrained-trunk recipe does (docs/hard-negatives/ZERO_SHOT.md)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import resolve_config
from training.stall import StallDetector
from training.trainer import Trainer

# 64 classes, each a random 4×4 binary pattern under a random tint, background, shift and noise: nuisances that
# dominate a random network's features. Half the classes train (32 classes × 4 images, batches of 16 classes × 2),
# so from scratch an anchor's one positive faces 30 negatives and nearly every triplet starts hard.
CLASSES, PER_CLASS, SIZE, EPOCHS, WINDOW = 64, 4, 16, 10, 10


def _image(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.kron(pattern, np.ones((SIZE // 4, SIZE // 4)))
    shifted = np.roll(cells, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    tint = rng.uniform(0.3, 1.0, size=3) * rng.uniform(120, 255)
    pixels = rng.uniform(0, 100, size=3) + shifted[..., None] * tint + rng.normal(0, 20, size=(SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many-classes")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        pattern = rng.integers(0, 2, size=(4, 4))
        (root / f"class_{c:02d}").mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(_image(pattern, rng)).save(root / f"class_{c:02d}" / f"{i}.png")
    return root


def _train(data: Path, out: Path, **settings) -> tuple[list[dict], str]:
    """A run of SCT from scratch with the folder dataset's defaults and ``settings``; its iterations and output.
    The stall rule's window is cut from 20 iterations to 10 to keep the run short."""
    config = resolve_config(
        "folder",
        str(data),
        str(out),
        overrides=dict(
            loss="sct",
            pretrained="none",
            arch="resnet18",
            dim=16,
            image_size=SIZE,
            epochs=EPOCHS,
            batch_size=32,
            workers=0,
            device="cpu",
            precision="fp32",
            eval_every=0,
            triplets_every=0,
            seed=0,
            **settings,
        ),
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = Trainer(config, progress=False)
        trainer.stall.detector = StallDetector(WINDOW)
        trainer.fit()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], printed.getvalue()


def _windows(steps: list[dict], key: str) -> list[float]:
    return [float(np.mean([step[key] for step in steps[i : i + WINDOW]])) for i in range(0, len(steps), WINDOW)]


@pytest.mark.timeout(120)
def test_sct_from_scratch_with_the_defaults_does_not_stall(many_classes: Path, tmp_path: Path) -> None:
    lines, printed = _train(many_classes, tmp_path / "default")
    steps = [line for line in lines if line.get("type") is None]
    assert len(steps) == EPOCHS * (CLASSES // 2 * PER_CLASS // 32)
    assert not [line for line in lines if line.get("type", "").startswith("stall")], printed
    assert "training has stalled" not in printed
    hard, s_ap = _windows(steps, "hard_fraction"), _windows(steps, "mean_s_ap")
    assert hard[0] > 0.5 and hard[-1] < 0.5 * hard[0], (hard, s_ap)  # it starts hard and leaves the all-hard start
    assert s_ap[-1] > s_ap[0] + 0.1, s_ap  # by pulling positives in


@pytest.mark.timeout(120)
def test_the_papers_sct_with_the_pretrained_recipe_stalls_there(many_classes: Path, tmp_path: Path) -> None:
    """The same run with the folder preset's settings for a pretrained trunk (SGD, lr 0.009, no momentum), the
    paper's linear head and no warm start, as `sct train --pretrained none` gave before it had its own defaults:
    the stall is caught."""
    lines, printed = _train(
        many_classes,
        tmp_path / "paper",
        optimizer="sgd",
        lr=0.009,
        momentum=0.0,
        weight_decay=0.0,
        sct_warmup=0.0,
        embedding_bn=False,
    )
    assert [line["type"] for line in lines if line.get("type", "").startswith("stall")][:1] == ["stall_start"]
    assert printed.count("warning: training has stalled") == 1
