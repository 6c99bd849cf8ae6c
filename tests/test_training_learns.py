"""A short CPU run of SCT raises Recall@1 on classes it never saw, above its value at initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import resolve_config
from training.trainer import Trainer

# A class is a random 4×4 binary pattern. Every image of it gets a random colour tint,
# brightness, shift and noise: nuisances that dominate a random network's features. The
# first half of the classes (sorted by name) trains, the second half tests, so the test
# patterns are unseen and only the learned invariance to the nuisances carries over.
CLASSES, PER_CLASS, SIZE = 16, 24, 32


def _image(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cells = np.kron(pattern, np.ones((SIZE // 4, SIZE // 4)))
    shifted = np.roll(cells, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
    tint = rng.uniform(0.3, 1.0, size=3) * rng.uniform(120, 255)
    background = rng.uniform(0, 100, size=3)
    pixels = background + shifted[..., None] * tint + rng.normal(0, 20, size=(SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        pattern = rng.integers(0, 2, size=(4, 4))
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(_image(pattern, rng)).save(folder / f"{i}.png")
    return root


@pytest.mark.timeout(240)
def test_sct_recall_on_unseen_classes_rises(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    config = resolve_config(
        "folder",
        str(data),
        str(tmp_path / "run"),
        overrides=dict(
            arch="resnet18",
            pretrained="none",
            dim=32,
            image_size=32,
            epochs=6,
            batch_size=32,
            images_per_class=4,
            optimizer="adamw",
            lr=0.002,
            weight_decay=1e-4,
            schedule="cosine",
            warmup_iters=5,
            augment=False,
            workers=0,
            device="cpu",
            precision="fp32",
            eval_every=0,
            triplets_every=0,
            seed=0,
            # the linear head: on these 8 training classes, in 36 steps, the embedding BatchNorm of the from-scratch
            # defaults reached Recall@1 0.76 against 0.86 (docs/hard-negatives/ZERO_SHOT.md, Limits)
            embedding_bn=False,
        ),
    )
    trainer = Trainer(config, progress=False)
    trainer.evaluate(-1)  # at initialisation
    trainer.fit()
    before, after = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert after["queries"] == CLASSES // 2 * PER_CLASS
    # Seeds 0-3 on 1 and 2 CPU threads (whose fp32 sums differ, and 36 steps carry that far): Recall@1 rose by
    # 0.03 to 0.22 from 0.66-0.74, MAP@R by 1.7× to 2.5× from 0.18-0.23. MAP@R, over every relevant item, is
    # the steadier of the two; Recall@1 at initialisation is already high on these classes.
    assert after["recall@1"] > before["recall@1"], (before, after)
    assert after["map@r"] >= 1.5 * before["map@r"], (before, after)
