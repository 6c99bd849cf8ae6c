"""The HTL class-tree schedule (training/htl_schedule.py) on its own: which epochs rebuild, what a rebuild
builds, logs and hands to the loss and the sampler, the images it is built from, and its checkpoint state."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalog import ImageRecord
from retrieval.preprocessing import Preprocessing
from training.config import resolve_config
from training.htl import build_tree
from training.htl_schedule import HTLSchedule, rebuild_due
from training.losses import build_loss
from training.run_folder import RunFolder
from training.sampler import HTLBatchSampler
from training.shared_embedding import SharedEmbedder, UnreadableImages

SPEC = Preprocessing(image_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES, PER_CLASS = 5, 4


@pytest.mark.parametrize(
    "every,holding_tree,due",
    [
        (0, True, [0]),  # built once, before the first epoch
        (1, True, [0, 1, 2, 3, 4, 5, 6]),
        (3, True, [0, 3, 6]),
        (3, False, [0, 1, 2, 3, 4, 5, 6]),  # no tree held (a resume from a checkpoint without one): build one
    ],
)
def test_which_epochs_rebuild(every: int, holding_tree: bool, due: list[int]) -> None:
    assert [epoch for epoch in range(7) if rebuild_due(epoch, every, holding_tree)] == due


class MeanColour(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def _schedule(tmp_path: Path, **settings) -> tuple[HTLSchedule, np.ndarray]:
    """A schedule over CLASSES single-colour classes of PER_CLASS images (colours near each class's own), and
    the unit embeddings MeanColour gives them, in record order."""
    rng = np.random.default_rng(0)
    records, expected = [], []
    for c in range(CLASSES):
        centre = rng.integers(40, 216, size=3)
        for i in range(PER_CLASS):
            colour = np.clip(centre + rng.integers(-30, 31, size=3), 0, 255)
            path = tmp_path / "data" / f"class_{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.broadcast_to(colour.astype(np.uint8), (8, 8, 3)).copy()).save(path)
            records.append(ImageRecord(str(path), f"class_{c}", "train"))
            vector = (colour / 255 - 0.5) / 0.25
            expected.append(vector / np.linalg.norm(vector))
    config = resolve_config(
        "folder",
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        overrides=dict(
            loss="htl", htl_neighbours=2, htl_levels=4, images_per_class=2, batch_size=8, seed=3, **settings
        ),
    )
    class_index = {f"class_{c}": c for c in range(CLASSES)}
    labels = [class_index[r.label] for r in records]
    loss_fn = build_loss("htl", lam=1.0, temperature=0.1, hard_threshold=None, margin=0.2, htl_beta=0.1)
    sampler = HTLBatchSampler(labels, 2, 2, 2, seed=3)
    embed = SharedEmbedder(SPEC, torch.device("cpu"), dim=3, workers=0, amp_dtype=None, unreadable=UnreadableImages())
    run = RunFolder(config.out)
    run.create(config)
    run.start_metrics()
    return HTLSchedule(config, records, class_index, loss_fn, sampler, embed, run), np.array(expected)


def test_a_rebuild_builds_logs_and_hands_the_tree_to_the_loss_and_the_sampler(tmp_path: Path, capsys) -> None:
    schedule, embeddings = _schedule(tmp_path, htl_rebuild_every=2)
    assert schedule.due(0) and schedule.loss_fn.tree is None and schedule.state() is None
    tree = schedule.rebuild(MeanColour(), epoch=0, iteration=0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    expected = build_tree(embeddings, labels, CLASSES, levels=4, neighbours=min(4, CLASSES - 1))
    np.testing.assert_array_equal(tree.level_ids, expected.level_ids)
    np.testing.assert_array_equal(tree.neighbours, expected.neighbours)
    assert tree.d0 == pytest.approx(expected.d0, abs=1e-5)
    assert schedule.tree is tree and schedule.loss_fn.tree is tree and schedule.sampler.neighbours is tree.neighbours
    assert [schedule.due(epoch) for epoch in (1, 2, 3, 4)] == [False, True, False, True]
    line = json.loads(schedule.run.metrics_path.read_text())
    assert list(line) == ["type", "epoch", "iter", "d0", "classes", "images", "seconds", "nodes_per_level"]
    assert (line["type"], line["epoch"], line["iter"], line["classes"], line["images"]) == (
        "htl_tree",
        0,
        0,
        CLASSES,
        CLASSES * PER_CLASS,
    )
    assert line["nodes_per_level"] == tree.nodes_per_level() and line["nodes_per_level"][-1] == 1
    printed = capsys.readouterr().out
    assert (
        f"epoch 1: HTL class tree over {CLASSES} classes from {CLASSES * PER_CLASS} images, d0 {tree.d0:.3f}, "
        f"nodes per level {' '.join(map(str, tree.nodes_per_level()))}" in printed
    )


def test_the_tree_is_built_from_at_most_n_images_per_class_drawn_per_epoch(tmp_path: Path) -> None:
    schedule, _ = _schedule(tmp_path, htl_tree_images_per_class=3)
    first, again, later = (schedule.tree_records(epoch) for epoch in (1, 1, 2))
    assert first == again and first != later  # drawn from (seed, epoch)
    for records in (first, later):
        assert sorted(r.label for r in records) == sorted(f"class_{c}" for c in range(CLASSES) for _ in range(3))
        positions = [schedule.train_records.index(r) for r in records]
        assert positions == sorted(positions)  # in the training split's order
    whole, _ = _schedule(tmp_path / "whole")
    assert whole.tree_records(1) == whole.train_records
    tree = schedule.rebuild(MeanColour(), epoch=1, iteration=8)
    assert tree.num_classes == CLASSES
    assert json.loads(schedule.run.metrics_path.read_text())["images"] == CLASSES * 3


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_the_tree_goes_through_a_checkpoint_and_back_to_the_loss_and_the_sampler(tmp_path: Path, device: str) -> None:
    """--resume loads the checkpoint onto the training device, the GPU's included."""
    schedule, _ = _schedule(tmp_path, htl_rebuild_every=0)
    tree = schedule.rebuild(MeanColour(), epoch=0, iteration=0)
    buffer = io.BytesIO()
    torch.save({"htl_tree": schedule.state()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), map_location=device, weights_only=True)["htl_tree"]
    resumed, _ = _schedule(tmp_path / "resumed", htl_rebuild_every=0)
    assert resumed.due(1)  # nothing held yet
    resumed.load_state(state)
    assert not resumed.due(1)
    for got in (resumed.tree, resumed.loss_fn.tree):
        for field in ("level_ids", "thresholds", "within", "neighbours"):
            np.testing.assert_array_equal(getattr(got, field), getattr(tree, field))
        assert got.d0 == tree.d0
    np.testing.assert_array_equal(resumed.sampler.neighbours, tree.neighbours)
