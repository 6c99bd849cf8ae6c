"""Hierarchical Triplet Loss: the class tree, anchor-neighbour batches, the dynamic margin, the loss, a short run."""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sct.cli import main
from tests.test_training_learns import CLASSES, PER_CLASS, _dataset
from tests.test_training_sampler import assert_deterministic_under_seed_and_epoch
from tests.test_training_trainer import _config, _images, _metrics, kill_after_first_checkpoint_then_resume
from training.config import resolve_config
from training.htl import ClassTree, build_tree, class_distances, class_means, margins, merge_level
from training.losses import HTLLoss, build_loss
from training.sampler import HTLBatchSampler
from training.trainer import Trainer

LEVELS = 16

# Hand-built tree: unit vectors in the xy-plane, each class a few images spread around an angle.
# A (0°) and B (30°) are close, C (100°) and D (130°) are close, E (250°) is far from all;
# class 5 has no images. Image counts differ so that per-class weighting matters.
HAND_CLASSES = {0: (0, [-10, 10]), 1: (30, [-10, 0, 10]), 2: (100, [-8, 8]), 3: (130, [-12, 12]), 4: (250, [-10, 10])}
A, B, C, D, E, ABSENT = range(6)


def _plane(degrees: np.ndarray) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians), np.zeros_like(radians)], axis=1)


def _hand_data() -> tuple[np.ndarray, np.ndarray]:
    embeddings, labels = [], []
    for cls, (angle, offsets) in HAND_CLASSES.items():
        embeddings.append(_plane(angle + np.array(offsets, dtype=float)))
        labels += [cls] * len(offsets)
    return np.concatenate(embeddings), np.array(labels)


def _explicit_distances(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class distances (mean over image pairs) and within-class s_p (mean over pairs i ≠ j), by double loops."""
    between = np.full((classes, classes), np.nan)
    within = np.full(classes, np.nan)
    members = {c: [f for f, y in zip(embeddings, labels) if y == c] for c in range(classes)}
    for p, q in itertools.product(range(classes), repeat=2):
        if members[p] and members[q]:
            between[p, q] = np.mean([np.sum((fi - fj) ** 2) for fi in members[p] for fj in members[q]])
    for p in range(classes):
        pairs = [np.sum((fi - fj) ** 2) for i, fi in enumerate(members[p]) for j, fj in enumerate(members[p]) if i != j]
        if pairs:
            within[p] = np.mean(pairs)
    return between, within


def _first_level_reaching(distance: float, d0: float, levels: int = LEVELS) -> int:
    """The smallest l ≥ 1 with l·(4 − d0)/L + d0 ≥ distance."""
    return next(level for level in range(1, levels + 1) if level * (4 - d0) / levels + d0 >= distance)


# ------------------------------------------------------------------ the tree
def test_class_distances_and_within_class_distances_match_explicit_loops() -> None:
    embeddings, labels = _hand_data()
    between, within = _explicit_distances(embeddings, labels, 6)
    means, counts = class_means(embeddings, labels, 6)
    present = counts > 0
    assert np.allclose(class_distances(means)[np.ix_(present, present)], between[np.ix_(present, present)], atol=1e-9)
    tree = build_tree(embeddings, labels, 6, levels=LEVELS)
    d0 = np.mean(within[present])
    assert tree.d0 == pytest.approx(d0, abs=1e-9)
    assert np.allclose(tree.within[present], within[present], atol=1e-9)
    assert tree.within[ABSENT] == pytest.approx(d0)  # a class without images gets s = d0
    assert np.allclose(tree.thresholds, [level * (4 - d0) / LEVELS + d0 for level in range(LEVELS + 1)])
    assert tree.thresholds[0] == pytest.approx(d0) and tree.thresholds[-1] == pytest.approx(4.0)


def test_merge_levels_follow_average_linkage_of_class_distances() -> None:
    embeddings, labels = _hand_data()
    between, _ = _explicit_distances(embeddings, labels, 6)
    tree = build_tree(embeddings, labels, 6, levels=LEVELS)
    # A–B and C–D merge first; {A, B}–{C, D} at the mean of their four class distances; E joins last.
    ab_cd = np.mean([between[A, C], between[A, D], between[B, C], between[B, D]])
    abcd_e = np.mean([between[A, E], between[B, E], between[C, E], between[D, E]])
    level = functools.partial(_first_level_reaching, d0=tree.d0)
    expected = {
        (A, B): level(between[A, B]),
        (C, D): level(between[C, D]),
        (A, C): level(ab_cd),
        (B, D): level(ab_cd),
        (A, E): level(abcd_e),
        (D, E): level(abcd_e),
        (A, ABSENT): LEVELS,
        (E, ABSENT): LEVELS,
        (C, C): 0,
    }
    assert {pair: expected[pair] for pair in [(A, B), (C, D), (A, C), (A, E)]} == {
        (A, B): 1,
        (C, D): 1,
        (A, C): 10,
        (A, E): 13,
    }  # worked out by hand from the angles
    for (p, q), level in expected.items():
        assert merge_level(tree, p, q) == level == merge_level(tree, q, p), (p, q)
    assert tree.nodes_per_level()[:2] == [6, 4]  # {A,B} {C,D} {E} {absent}
    assert tree.nodes_per_level()[-1] == 1
    assert tree.nodes_per_level()[LEVELS - 1] == 2  # the class without images joins only at level L


def test_levels_are_nested_and_everything_merges_by_level_l() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8))
    embeddings = np.concatenate([centres[c // 8] + 0.6 * rng.normal(size=(3, 8)) for c in range(48)])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tree = build_tree(embeddings, np.repeat(np.arange(48), 3), 48, levels=LEVELS)
    counts = tree.nodes_per_level()
    assert counts[0] == 48 and counts[-1] == 1 and counts == sorted(counts, reverse=True)
    assert 1 < len(set(counts))  # the test data has structure between the extremes
    for lower, upper in zip(tree.level_ids[:-1], tree.level_ids[1:]):
        together = lower[:, None] == lower[None, :]
        assert np.all(together <= (upper[:, None] == upper[None, :]))  # a merge is never undone


def test_faiss_neighbours_equal_brute_force() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(40), 3)
    embeddings = rng.normal(size=(120, 16)) + 0.5 * rng.normal(size=(40, 16))[labels]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels[labels == 7] = 8  # class 7 ends up without images
    tree = build_tree(embeddings, labels, 40, levels=LEVELS, neighbours=5)
    means = np.stack([embeddings[labels == c].mean(0) if (labels == c).any() else np.zeros(16) for c in range(40)])
    inner = means @ means.T
    inner[np.arange(40), np.arange(40)] = -np.inf
    inner[:, 7] = -np.inf
    expected = np.argsort(-inner, axis=1, kind="stable")[:, :5]
    present = np.arange(40) != 7
    assert np.array_equal(tree.neighbours[present], expected[present])
    assert np.all(tree.neighbours[7] == -1)


def test_building_a_tree_over_ten_thousand_classes_completes() -> None:
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(30_000, 64)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tree = build_tree(embeddings, np.repeat(np.arange(10_000), 3), 10_000, levels=LEVELS, neighbours=3)
    assert tree.level_ids.shape == (LEVELS + 1, 10_000) and tree.neighbours.shape == (10_000, 3)
    assert tree.nodes_per_level()[0] == 10_000 and tree.nodes_per_level()[-1] == 1


# ------------------------------------------------------------------ margins and the loss
def _small_tree() -> ClassTree:
    """Four classes: {0, 1} merge at level 1, {0, 1, 2} at level 2, class 3 only at level 3 = L."""
    return ClassTree(
        level_ids=np.array([[0, 1, 2, 3], [5, 5, 6, 7], [5, 5, 5, 7], [0, 0, 0, 0]]),
        thresholds=np.array([0.4, 1.6, 2.8, 4.0]),
        within=np.array([0.3, 0.5, 3.1, 0.4]),
        d0=0.4,
        neighbours=np.array([[1, 2], [0, 2], [1, 0], [2, 1]]),
    )


def test_margins_match_the_formula_by_hand() -> None:
    tree, beta = _small_tree(), 0.1
    by_hand = {
        (0, 1): 0.1 + 1.6 - 0.3,
        (1, 0): 0.1 + 1.6 - 0.5,
        (0, 2): 0.1 + 2.8 - 0.3,
        (1, 3): 0.1 + 4.0 - 0.5,
        (2, 0): 0.0,  # 0.1 + 2.8 − 3.1 < 0: clamped
        (2, 3): 0.1 + 4.0 - 3.1,
    }
    anchors, negatives = (np.array(side) for side in zip(*by_hand))
    assert merge_level(tree, anchors, negatives).tolist() == [1, 1, 2, 3, 2, 3]
    assert np.allclose(margins(tree, anchors, negatives, beta), list(by_hand.values()))
    grid = margins(tree, np.arange(4)[:, None], np.arange(4)[None, :], beta)  # broadcasts to all pairs
    assert grid.shape == (4, 4) and grid[2, 0] == 0.0 and grid[0, 2] == pytest.approx(2.6)


def reference_htl(embeddings: torch.Tensor, labels: list[int], tree: ClassTree | None, beta: float) -> torch.Tensor:
    """[‖f_a − f_p‖² − ‖f_a − f_n‖² + α]_+ averaged over every (a, p, n), triplet by triplet."""
    unit = [e / e.norm() for e in embeddings]
    terms = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if p == a or labels[p] != labels[a] or labels[n] == labels[a]:
            continue
        alpha = beta
        if tree is not None:
            level = next(
                lv
                for lv in range(len(tree.thresholds))
                if tree.level_ids[lv][labels[a]] == tree.level_ids[lv][labels[n]]
            )
            alpha = max(beta + tree.thresholds[level] - tree.within[labels[a]], 0.0)
        terms.append(torch.relu(((unit[a] - unit[p]) ** 2).sum() - ((unit[a] - unit[n]) ** 2).sum() + alpha))
    return torch.stack(terms).mean() if terms else embeddings.sum() * 0


@pytest.mark.parametrize("with_tree", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_explicit_loop_over_all_triplets(with_tree: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    embeddings = (torch.randn(4, 5, generator=generator)[labels] + torch.randn(9, 5, generator=generator)).double()
    tree = _small_tree() if with_tree else None
    loss_fn = HTLLoss(beta=0.1)
    loss_fn.set_tree(tree)
    ours_input, reference_input = embeddings.clone().requires_grad_(True), embeddings.clone().requires_grad_(True)
    ours = loss_fn(ours_input.float(), torch.tensor(labels))
    expected = reference_htl(reference_input, labels, tree, beta=0.1)
    ours.backward()
    expected.backward()
    assert math.isclose(ours.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5)
    assert torch.allclose(ours_input.grad.float(), reference_input.grad.float(), atol=1e-4, rtol=1e-3)
    stats = loss_fn.stats  # logged like every other loss: each anchor's easiest positive and hardest negative
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sims = unit @ unit.T
    pairs = [
        (
            max(float(sims[a, p]) for p in range(len(labels)) if p != a and labels[p] == labels[a]),
            max(float(sims[a, n]) for n in range(len(labels)) if labels[n] != labels[a]),
        )
        for a in range(len(labels))
    ]
    assert stats.valid_anchors == len(labels) and torch.allclose(stats.pairs, torch.tensor(pairs), atol=1e-6)
    assert stats.hard_fraction == pytest.approx(sum(s_an > s_ap for s_ap, s_an in pairs) / len(pairs))


def test_tree_changes_the_loss_and_build_loss_knows_htl() -> None:
    embeddings = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss_fn = build_loss("htl", lam=1.0, temperature=0.1, hard_threshold=None, htl_beta=0.2)
    assert isinstance(loss_fn, HTLLoss) and loss_fn.beta == 0.2
    flat = loss_fn(embeddings, labels).item()
    loss_fn.set_tree(_small_tree())
    assert loss_fn(embeddings, labels).item() != pytest.approx(flat)


@pytest.mark.parametrize("with_tree", [False, True])
def test_gradient_is_finite_when_every_embedding_is_the_same(with_tree: bool) -> None:
    embeddings = torch.ones(8, 4, requires_grad=True)
    loss_fn = HTLLoss(beta=0.1)
    loss_fn.set_tree(_small_tree() if with_tree else None)
    loss = loss_fn(embeddings, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0  # every distance is 0, so every triplet costs its margin
    assert torch.isfinite(embeddings.grad).all()
    no_triplet = HTLLoss()(torch.randn(4, 4, requires_grad=True), torch.tensor([0, 1, 2, 3]))
    assert no_triplet.item() == 0.0


# ------------------------------------------------------------------ the sampler
def _clique_labels() -> list[int]:
    return [c for c in range(12) for _ in range(5)]


def _clique_neighbours() -> np.ndarray:
    """Three cliques of four classes: each class's nearest are the other three of its clique, then the rest."""
    rows = []
    for c in range(12):
        clique = [d for d in range(c // 4 * 4, c // 4 * 4 + 4) if d != c]
        rows.append(clique + [d for d in range(12) if d != c and d not in clique][:2])
    return np.array(rows)


def _groups(batch: list[int], labels: list[int], m: int, t: int) -> list[list[int]]:
    classes = [labels[i] for i in batch[::t]]
    assert all(labels[i] == classes[j // t] for j, i in enumerate(batch))  # t images of a class in a row
    return [classes[g : g + m] for g in range(0, len(classes), m)]


def test_batches_are_groups_of_a_class_and_its_nearest_classes() -> None:
    labels, neighbours = _clique_labels(), _clique_neighbours()
    sampler = HTLBatchSampler(labels, groups_per_batch=2, classes_per_group=4, images_per_class=2, seed=0)
    sampler.update_neighbours(neighbours)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // (2 * 4 * 2)
    for batch in batches:
        assert len(batch) == 16 and len(set(batch)) == 16
        groups = _groups(batch, labels, 4, 2)
        assert len(groups) == 2
        for group in groups:
            assert group[1:] == list(neighbours[group[0]][:3])  # its three nearest, nearest first
        assert len({c for group in groups for c in group}) == 8


def test_a_neighbour_already_in_the_batch_is_replaced_by_the_next_nearest() -> None:
    rng = np.random.default_rng(4)
    labels = [c for c in range(10) for _ in range(3)]
    neighbours = np.array([rng.permutation([d for d in range(10) if d != c])[:5] for c in range(10)])
    sampler = HTLBatchSampler(labels, groups_per_batch=3, classes_per_group=3, images_per_class=2, seed=2)
    sampler.update_neighbours(neighbours)
    replaced = 0
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            groups = _groups(batch, labels, 3, 2)
            seen: list[int] = []
            for group in groups:
                seen.append(group[0])
                wanted = [c for c in neighbours[group[0]] if c not in seen][:2]
                replaced += list(neighbours[group[0]][:2]) != wanted
                assert group[1:] == wanted
                seen += wanted
            assert len(seen) == len(set(seen)) == 9
    assert replaced  # the rule was exercised


def test_without_neighbours_groups_are_random_classes_and_small_classes_are_resampled() -> None:
    labels = [0] * 6 + [1] * 1 + [2] * 4 + [3] * 5 + [4] * 4 + [5] * 4  # class 1 has fewer than t = 2 images
    sampler = HTLBatchSampler(labels, groups_per_batch=2, classes_per_group=2, images_per_class=2, seed=0)
    batches = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches += list(sampler)
    for batch in batches:
        per_class = Counter(labels[i] for i in batch)
        assert len(per_class) == 4 and set(per_class.values()) == {2}
    assert any(1 in {labels[i] for i in batch} for batch in batches)


def test_sampler_is_deterministic_under_seed_and_epoch() -> None:
    labels, neighbours = _clique_labels(), _clique_neighbours()

    def make(seed: int) -> HTLBatchSampler:
        sampler = HTLBatchSampler(labels, 2, 4, 2, seed=seed)
        sampler.update_neighbours(neighbours)
        return sampler

    assert_deterministic_under_seed_and_epoch(make)


def test_sampler_refuses_more_classes_than_exist() -> None:
    with pytest.raises(ValueError, match="needs at least that many classes"):
        HTLBatchSampler([0, 0, 1, 1, 2, 2], groups_per_batch=2, classes_per_group=2, images_per_class=2)


# ------------------------------------------------------------------ settings and command line
def test_htl_settings_are_validated_with_the_numbers(tmp_path: Path) -> None:
    def config(**overrides):
        return resolve_config("folder", ".", str(tmp_path), overrides=dict(loss="htl", **overrides))

    assert config(batch_size=128, images_per_class=2).htl_neighbours == 4
    with pytest.raises(ValueError, match=r"batch size 124 .* 4 × 2 = 8"):
        config(batch_size=124, images_per_class=2)
    with pytest.raises(ValueError, match="htl_levels must be at least 1, got 0"):
        config(htl_levels=0)
    with pytest.raises(ValueError, match="htl_tree_images_per_class .* got 1"):
        config(htl_tree_images_per_class=1)
    other_loss = resolve_config("folder", ".", str(tmp_path), overrides=dict(batch_size=124, images_per_class=2))
    assert other_loss.loss == "sct"  # the HTL rule applies to --loss htl only


def test_train_help_lists_htl_and_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for text in (
        "htl",
        "--htl-levels",
        "--htl-beta",
        "--htl-neighbours",
        "--htl-rebuild-every",
        "--htl-tree-images-per-class",
        "--loss htl",
    ):
        assert text in out, text


# ------------------------------------------------------------------ training
@pytest.mark.timeout(120)
def test_htl_recall_on_unseen_classes_rises_and_trees_are_logged(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    config = resolve_config(
        "folder",
        str(data),
        str(tmp_path / "run"),
        overrides=dict(
            loss="htl",
            htl_neighbours=2,
            arch="resnet18",
            pretrained="none",
            dim=32,
            image_size=32,
            epochs=6,
            batch_size=24,
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
        ),
    )
    trainer = Trainer(config, progress=False)
    trainer.evaluate(-1)  # at initialisation
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before, after = [line for line in lines if line.get("type") == "eval"]
    assert after["queries"] == CLASSES // 2 * PER_CLASS
    assert after["recall@1"] >= before["recall@1"] + 0.05, (before, after)
    assert after["map@r"] >= 1.5 * before["map@r"], (before, after)
    trees = [line for line in lines if line.get("type") == "htl_tree"]
    assert [t["epoch"] for t in trees] == list(range(6))
    assert all(
        t["classes"] == CLASSES // 2
        and len(t["nodes_per_level"]) == LEVELS + 1
        and t["d0"] > 0
        and t["nodes_per_level"][0] == CLASSES // 2
        and t["nodes_per_level"][-1] == 1
        for t in trees
    )
    steps = [line for line in lines if "type" not in line]
    assert steps and all(
        set(s) == {"iter", "epoch", "loss", "hard_fraction", "mean_s_ap", "mean_s_an", "lr", "images_per_s"}
        for s in steps
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rebuild_every,images_per_class", [(0, None), (1, 3)])
def test_htl_resume_matches_an_unbroken_run(tmp_path: Path, rebuild_every: int, images_per_class: int | None) -> None:
    """Rebuilt every epoch, the resumed run rebuilds from the checkpoint's model; built once, it goes on with
    the tree saved in the checkpoint. Either way its log matches the unbroken run's."""
    data = _images(tmp_path / "data")  # 3 training classes × 4 images
    settings = dict(
        loss="htl",
        htl_neighbours=2,
        htl_rebuild_every=rebuild_every,
        htl_tree_images_per_class=images_per_class,
        epochs=3,
        eval_every=0,
        triplets_every=0,
    )
    Trainer(_config(data, tmp_path / "whole", **settings), progress=False).fit()

    kill_after_first_checkpoint_then_resume(_config(data, tmp_path / "broken", **settings))

    whole, resumed = _metrics(tmp_path / "whole"), _metrics(tmp_path / "broken")
    assert [(m.get("type"), m["iter"]) for m in whole] == [(m.get("type"), m["iter"]) for m in resumed]
    trees = [m for m in whole if m.get("type") == "htl_tree"]
    assert len(trees) == (3 if rebuild_every else 1)
    assert all(t["images"] == 3 * (images_per_class or 4) for t in trees)
    for a, b in zip(whole, resumed):
        for key in ("loss", "hard_fraction", "mean_s_ap", "d0", "recall@1"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
