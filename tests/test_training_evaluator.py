"""The evaluator (training/evaluator.py) on its own: Recall@K and MAP@R of a model whose embeddings are known by
construction, checked against a brute-force count in numpy; the eval line; the collapse warning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalog import ImageRecord
from retrieval.preprocessing import Preprocessing
from training.evaluator import Evaluator
from training.run_folder import RunFolder
from training.shared_embedding import SharedEmbedder, UnreadableImages

SPEC = Preprocessing(image_size=8, resize_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
KS = (1, 2, 4)


class MeanColour(torch.nn.Module):
    """The mean of each input channel: a single-colour image's embedding is its normalised colour."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


class Collapsed(torch.nn.Module):
    """Nearly the same vector for every image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(images), 3) + 1e-3 * images.mean(dim=(2, 3))


def _records(root: Path, split: str, sizes: dict[str, int], seed: int) -> tuple[list[ImageRecord], np.ndarray]:
    """Single-colour images, ``sizes[label]`` of each label, in random colours; and their unit embeddings
    under MeanColour, computed here from the colours."""
    rng = np.random.default_rng(seed)
    records, expected = [], []
    for label, count in sizes.items():
        for i in range(count):
            colour = rng.integers(0, 256, size=3)
            path = root / split / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.broadcast_to(colour.astype(np.uint8), (12, 12, 3)).copy()).save(path)
            records.append(ImageRecord(str(path), label, split))
            vector = (colour / 255 - np.array(SPEC.mean)) / np.array(SPEC.std)
            expected.append(vector / np.linalg.norm(vector))
    return records, np.array(expected)


def brute_force(
    queries: np.ndarray,
    query_labels: list[str],
    gallery: np.ndarray | None,
    gallery_labels: list[str] | None,
    ks: tuple[int, ...],
) -> dict[str, float]:
    """Recall@K and MAP@R by sorting every query's similarities; leave-one-out when there is no gallery."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    found = {k: [] for k in ks}
    average_precisions = []
    for i, (query, label) in enumerate(zip(queries, query_labels)):
        others = [j for j in range(len(gallery)) if not (leave_one_out and j == i)]
        order = sorted(others, key=lambda j: -float(query @ gallery[j]))
        hits = [gallery_labels[j] == label for j in order]
        relevant = sum(hits)
        if relevant == 0:
            continue
        for k in ks:
            found[k].append(any(hits[:k]))
        average_precisions.append(sum(sum(hits[:n]) / n for n in range(1, relevant + 1) if hits[n - 1]) / relevant)
    results = {f"recall@{k}": float(np.mean(found[k])) for k in ks}
    results.update(
        {
            "map@r": float(np.mean(average_precisions)),
            "queries": len(average_precisions),
            "skipped": len(queries) - len(average_precisions),
        }
    )
    return results


def _evaluator(
    tmp_path: Path, queries: list[ImageRecord], gallery: list[ImageRecord] | None, split: str = "test"
) -> tuple[Evaluator, UnreadableImages]:
    unreadable = UnreadableImages()
    embed = SharedEmbedder(SPEC, torch.device("cpu"), dim=3, workers=0, amp_dtype=None, unreadable=unreadable)
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.start_metrics()
    return Evaluator(queries, gallery, split, KS, embed, run), unreadable


def _lines(evaluator: Evaluator) -> list[dict]:
    return [json.loads(line) for line in evaluator.run.metrics_path.read_text().splitlines()]


def test_leave_one_out_recall_and_map_match_a_brute_force_count(tmp_path: Path, capsys) -> None:
    """Four classes of 1–5 images in random colours, and an unreadable image: the one-image class's query is
    skipped, the unreadable image counted and left out."""
    records, expected = _records(tmp_path, "test", {"a": 5, "b": 4, "c": 3, "lonely": 1}, seed=0)
    broken = tmp_path / "test" / "a" / "broken.png"
    broken.write_bytes(b"not an image")
    evaluator, unreadable = _evaluator(
        tmp_path, records[:3] + [ImageRecord(str(broken), "a", "test")] + records[3:], None
    )
    recall = evaluator.evaluate(MeanColour(), epoch=2, iteration=30)
    want = brute_force(expected, [r.label for r in records], None, None, KS)
    assert want["skipped"] == 1 and 0 < want["recall@1"] < want["recall@4"] < 1  # not a trivial set
    line = _lines(evaluator)[-1]
    assert list(line) == [
        "type",
        "epoch",
        "iter",
        "split",
        "recall@1",
        "recall@2",
        "recall@4",
        "map@r",
        "precision@1",
        "queries",
        "skipped",
        "mean_similarity",
    ]
    assert (line["type"], line["epoch"], line["iter"], line["split"]) == ("eval", 2, 30, "test")
    for key, value in want.items():
        assert line[key] == pytest.approx(value), key
    assert line["precision@1"] == pytest.approx(want["recall@1"])
    sims = expected @ expected.T
    mean_similarity = (sims.sum() - np.trace(sims)) / (len(sims) * (len(sims) - 1))
    assert line["mean_similarity"] == pytest.approx(mean_similarity, abs=1e-6)  # from float32 embeddings
    assert recall == pytest.approx(want["recall@1"]) and unreadable.count == 1
    out = capsys.readouterr().out
    assert (
        f"epoch 3: R@1 {want['recall@1']:.4f}  R@2 {want['recall@2']:.4f}  R@4 {want['recall@4']:.4f}  "
        f"MAP@R {want['map@r']:.4f}  ({want['queries']} queries)" in out
    )
    assert "collapsed" not in out


def test_queries_against_a_gallery_match_a_brute_force_count(tmp_path: Path) -> None:
    queries, query_emb = _records(tmp_path, "query", {"a": 3, "b": 3, "c": 2}, seed=1)
    gallery, gallery_emb = _records(tmp_path, "gallery", {"a": 4, "b": 2, "c": 3, "d": 3}, seed=2)
    evaluator, _ = _evaluator(tmp_path, queries, gallery, split="query")
    recall = evaluator.evaluate(MeanColour(), epoch=0, iteration=4)
    want = brute_force(query_emb, [r.label for r in queries], gallery_emb, [r.label for r in gallery], KS)
    assert want["skipped"] == 0 and 0 < want["recall@1"] < 1
    line = _lines(evaluator)[-1]
    assert line["split"] == "query"
    for key, value in want.items():
        assert line[key] == pytest.approx(value), key
    assert recall == pytest.approx(want["recall@1"])


def test_a_collapsed_embedding_is_flagged(tmp_path: Path, capsys) -> None:
    """Every image at nearly the same point: the eval line records a mean pairwise similarity near 1 and a
    warning says what to try."""
    records, _ = _records(tmp_path, "val", {"a": 3, "b": 3}, seed=3)
    evaluator, _ = _evaluator(tmp_path, records, None, split="val")
    evaluator.evaluate(Collapsed(), epoch=0, iteration=0)
    assert _lines(evaluator)[-1]["mean_similarity"] > 0.99
    out = capsys.readouterr().out
    assert "warning: the embedding looks collapsed: mean pairwise similarity 1.000 over the val images" in out
    assert "--lr" in out and "--lam" in out
    evaluator.evaluate(MeanColour(), epoch=1, iteration=1)
    assert _lines(evaluator)[-1]["mean_similarity"] < 0.95 and "collapsed" not in capsys.readouterr().out
