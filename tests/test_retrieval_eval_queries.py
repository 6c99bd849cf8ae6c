"""`sct eval`'s per-query file (eval_queries.npz) and --per-class table, checked against brute force in numpy
on the gallery's own stored vectors: the full similarity matrix and explicit loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_tiny_model
from retrieval.gallery import Gallery
from retrieval.image_folder import list_image_folder
from retrieval.query_results import QUERY_RESULTS_FILE, load_query_results
from sct.cli import main

CLASSES = ["ash", "birch", "cedar", "elm"]


def write_images(directory, labels, seed):
    """One image of a random colour per label: labels do not follow colours, so results are far from perfect
    and similarities spread over [-1, 1]."""
    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
        colour = rng.integers(0, 256, size=3)
        pixels = np.clip(colour + rng.integers(-8, 9, size=(16, 16, 3)), 0, 255).astype(np.uint8)
        (directory / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(directory / label / f"{i}.png")


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-queries")
    model = make_tiny_model(root / "model.onnx")
    write_images(root / "images", [label for label in CLASSES for _ in range(7)] + ["lonely"], seed=1)
    write_images(root / "queries", [label for label in CLASSES for _ in range(3)] + ["alder"] * 2, seed=2)
    out = root / "gallery"
    assert main(["index", "--model", str(model), "--images", str(root / "images"), "--out", str(out)]) == 0
    return out


def brute_force(vectors, labels, queries, query_labels, query_ids, depth, top):
    """Per evaluated query: (row, first correct rank or 0 beyond depth, R, AP@R, R-precision, top ids, top
    scores); and the positive / negative similarity histograms, from the full similarity matrix."""
    similarities = queries.astype(np.float64) @ vectors.astype(np.float64).T
    edges = np.linspace(-1, 1, 101)
    rows, positive, negative = [], np.zeros(100, dtype=np.int64), np.zeros(100, dtype=np.int64)
    for q, (label, own_id) in enumerate(zip(query_labels, query_ids)):
        others = [j for j in range(len(vectors)) if j != own_id]
        relevant = sum(labels[j] == label for j in others)
        if relevant == 0:
            continue
        ranked = sorted(others, key=lambda j: -similarities[q, j])
        correct = [labels[j] == label for j in ranked]
        first = next(i + 1 for i, c in enumerate(correct) if c)
        found, precision_sum = 0, 0.0
        for i in range(relevant):
            if correct[i]:
                found += 1
                precision_sum += found / (i + 1)
        top_ids = ranked[:top] + [-1] * (top - len(ranked[:top]))
        top_scores = [similarities[q, j] for j in ranked[:top]] + [np.nan] * (top - len(ranked[:top]))
        rows.append((q, first if first <= depth else 0, relevant, precision_sum / relevant, found / relevant,
                     top_ids, top_scores))  # fmt: skip
        same = np.array([labels[j] == label for j in others])
        values = np.clip(similarities[q, others], -1, 1)
        positive += np.histogram(values[same], bins=edges)[0]
        negative += np.histogram(values[~same], bins=edges)[0]
    return rows, positive, negative


def assert_rows_match(saved, expected, positive, negative):
    assert len(saved) == len(expected)
    np.testing.assert_array_equal(saved.first_correct_rank, [row[1] for row in expected])
    np.testing.assert_array_equal(saved.relevant, [row[2] for row in expected])
    np.testing.assert_allclose(saved.ap_at_r, [row[3] for row in expected], atol=1e-6)
    np.testing.assert_allclose(saved.r_precision, [row[4] for row in expected], atol=1e-6)
    np.testing.assert_array_equal(saved.top_ids, [row[5] for row in expected])
    np.testing.assert_allclose(saved.top_scores, [row[6] for row in expected], atol=1e-5)
    np.testing.assert_array_equal(saved.hist_edges, np.linspace(-1, 1, 101))
    np.testing.assert_array_equal(saved.hist_positive, positive)
    np.testing.assert_array_equal(saved.hist_negative, negative)


def per_class_rows(saved, expected):
    """The --per-class table's rows from the brute-force results, by a loop: worst first."""
    table = []
    for name in sorted({saved.label_of(i) for i in range(len(saved))}):
        mine = [row for i, row in enumerate(expected) if saved.label_of(i) == name]
        recall = sum(row[1] == 1 for row in mine) / len(mine)
        average = sum(row[3] for row in mine) / len(mine)
        table.append((recall, average, name, len(mine)))
    return [
        [name, str(count), f"{100 * recall:.2f}%", f"{100 * average:.2f}%"]
        for recall, average, name, count in sorted(table)
    ]


def test_leave_one_out_file_and_per_class_table_match_brute_force(gallery_dir, capsys):
    assert main(["eval", "--index", str(gallery_dir), "--k", "1", "2", "--save-top", "4", "--per-class"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {gallery_dir / QUERY_RESULTS_FILE}" in captured.err
    gallery = Gallery.load(gallery_dir)
    vectors, labels = gallery.vectors()[:], gallery.labels
    saved, report = load_query_results(gallery_dir), json.loads((gallery_dir / "eval.json").read_text())
    assert saved.mode == "leave-one-out" and saved.model_sha256 == gallery.manifest["model_sha256"]
    assert saved.depth == 6 and saved.top_ids.shape == (28, 4)  # depth: the largest R (6) > K = 4 > k = 2
    expected, positive, negative = brute_force(
        vectors, labels, vectors, labels, range(len(vectors)), saved.depth, top=4
    )
    assert_rows_match(saved, expected, positive, negative)
    np.testing.assert_array_equal(saved.query_item, [row[0] for row in expected])
    assert saved.query_path.shape == (0,)
    assert [saved.label_of(i) for i in range(len(saved))] == [labels[row[0]] for row in expected]
    assert "lonely" in saved.label_names.tolist() and "lonely" not in labels[saved.query_item].tolist()
    assert saved.hist_queries == len(saved) == report["queries"] == 28 and report["skipped"] == 1
    assert positive.sum() == saved.relevant.sum() and positive.sum() + negative.sum() == 28 * 28
    assert (saved.first_correct_rank == 0).any() and (saved.first_correct_rank > 1).any()  # not degenerate
    assert 0 < np.count_nonzero(negative[:50]) and 0 < np.count_nonzero(positive)  # spread, negatives included
    assert np.mean(saved.ap_at_r) == pytest.approx(report["map@r"], abs=1e-6)
    assert np.mean(saved.first_correct_rank == 1) == pytest.approx(report["recall@1"], abs=1e-12)

    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["class", "queries", "recall@1", "map@r"])
    assert lines[header - 1] == "" and "map@r" in "\n".join(lines[:header])  # after the usual table
    printed = [line.split() for line in lines[header + 1 :]]
    assert printed == per_class_rows(saved, expected)
    assert len(printed) == len(CLASSES)


def test_external_queries_file_matches_brute_force(gallery_dir, capsys):
    queries_dir = gallery_dir.parent / "queries"
    assert main(["eval", "--index", str(gallery_dir), "--queries-images", str(queries_dir), "--k", "1"]) == 0
    assert "class  queries" not in capsys.readouterr().out  # no --per-class, no table
    gallery = Gallery.load(gallery_dir)
    vectors, labels = gallery.vectors()[:], gallery.labels
    listed = list_image_folder(queries_dir)
    embedded = gallery.embedder.embed_paths([path for path, _ in listed], progress=False)
    assert len(embedded.kept_indices) == len(listed) == 14
    query_labels = [label for _, label in listed]
    saved, report = load_query_results(gallery_dir), json.loads((gallery_dir / "eval.json").read_text())
    assert saved.mode == "queries" and saved.top_ids.shape == (12, 10)  # default --save-top 10
    assert saved.depth == 10  # K (10) > the largest R (7)
    expected, positive, negative = brute_force(
        vectors, labels, embedded.embeddings, query_labels, [-1] * len(listed), saved.depth, top=10
    )
    assert_rows_match(saved, expected, positive, negative)
    assert (saved.query_item == -1).all()
    assert [path.decode() for path in saved.query_path] == [listed[row[0]][0] for row in expected]
    assert "alder" not in [saved.label_of(i) for i in range(len(saved))]
    assert saved.hist_queries == report["queries"] == 12 and report["skipped"] == 2
    assert positive.sum() + negative.sum() == 12 * len(vectors)
    assert np.mean(saved.ap_at_r) == pytest.approx(report["map@r"], abs=1e-6)
    assert np.mean(saved.first_correct_rank == 1) == pytest.approx(report["recall@1"], abs=1e-12)


def test_save_top_must_be_positive(gallery_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--index", str(gallery_dir), "--save-top", "0"])
    assert exit_info.value.code == 2 and "--save-top" in capsys.readouterr().err
