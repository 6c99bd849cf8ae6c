"""``sct index`` / ``eval`` / ``search`` through the handlers that ``register`` installs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import load_rgb
from retrieval.gallery import Gallery
from sct.cli import main


def sct(argv: list[str]) -> int:
    """The `sct` command line (sct.cli.main reports a UserError as `error: ...` and status 2)."""
    return main(argv)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_model(root / "model.onnx")
    images = make_color_images(root / "images", per_class=4)
    (root / "images" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    queries = make_color_images(root / "queries", per_class=2, seed=9)
    return {"root": root, "model": model, "images": images, "queries": queries}


@pytest.fixture(scope="module")
def gallery_dir(workspace):
    out = workspace["root"] / "index_data" / "colors"
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["root"] / "images"),
                "--out", str(out), "--batch-size", "5"]) == 0  # fmt: skip
    return out


def leave_one_out_recall(embeddings: np.ndarray, labels: np.ndarray, k: int) -> float:
    similarities = embeddings @ embeddings.T
    np.fill_diagonal(similarities, -np.inf)
    top = np.argsort(-similarities, axis=1)[:, :k]
    return float(np.mean([(labels[row] == labels[i]).any() for i, row in enumerate(top)]))


def test_index_from_an_image_folder_skips_unreadable_images(gallery_dir, workspace, capsys):
    out = workspace["root"] / "index_data" / "again"
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["root"] / "images"),
                "--out", str(out), "--index-type", "hnsw"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "skipped 1 unreadable image(s)" in captured.err
    assert f"wrote {out}: 12 items, 8-d, FAISS HNSW32, Recall@10 vs exact search" in captured.out
    gallery = Gallery.load(gallery_dir)
    assert len(gallery.items) == 12 and gallery.manifest["dataset"] == "image-folder"
    assert sorted(set(gallery.labels.tolist())) == ["blue", "green", "red"]
    assert all(item.path.startswith("/") and "broken" not in item.path for item in gallery.items)


def test_index_a_catalog_dataset_uses_its_test_split(workspace, tmp_path, capsys):
    out = tmp_path / "folder-test"
    assert sct(["index", "--model", str(workspace["model"]), "--dataset", "folder",
                "--data-root", str(workspace["root"] / "queries"), "--out", str(out)]) == 0  # fmt: skip
    assert "6 images, 3 classes" in capsys.readouterr().err  # catalog.summarize
    gallery = Gallery.load(out)
    assert gallery.manifest["split"] == "test" and sorted(set(gallery.labels.tolist())) == ["green", "red"]


def test_eval_leave_one_out_writes_eval_json(gallery_dir, tmp_path, capsys):
    report = tmp_path / "reports" / "colors.json"
    assert sct(["eval", "--index", str(gallery_dir), "--k", "1", "3", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "recall@1" in table and "map@r" in table and "queries" in table
    saved = json.loads((gallery_dir / "eval.json").read_text())
    assert json.loads(report.read_text()) == saved
    gallery = Gallery.load(gallery_dir)
    embeddings = gallery.embeddings()
    assert saved["ks"] == [1, 3] and saved["mode"] == "leave-one-out" and saved["gallery"] == "colors"
    assert saved["model_sha256"] == gallery.manifest["model_sha256"] and saved["created"]
    assert (saved["queries"], saved["skipped"]) == (12, 0)
    for k in (1, 3):
        assert saved[f"recall@{k}"] == pytest.approx(leave_one_out_recall(embeddings, gallery.labels, k))
    assert f"{100 * saved['recall@1']:.2f}%" in table


def test_eval_with_query_images(gallery_dir, workspace, capsys):
    assert sct(["eval", "--index", str(gallery_dir), "--queries-images", str(workspace["root"] / "queries"),
                "--k", "1"]) == 0  # fmt: skip
    saved = json.loads((gallery_dir / "eval.json").read_text())
    assert saved["mode"] == "queries" and saved["queries"] == 6 and saved["recall@1"] == 1.0
    assert "recall@1" in capsys.readouterr().out


def test_search_prints_the_nearest_items(gallery_dir, workspace, capsys):
    query = workspace["queries"][0]  # a red image not in the gallery
    assert sct(["search", "--index", str(gallery_dir), str(query), "--k", "3"]) == 0
    captured = capsys.readouterr()
    assert "embedding" not in captured.err  # one batch: no progress bar
    lines = captured.out.splitlines()
    assert lines[0] == f"query: {query}" and lines[1].split() == ["rank", "score", "label", "id", "path"]
    gallery = Gallery.load(gallery_dir)
    expected_scores, expected_ids = gallery.search(gallery.embedder.embed_images([load_rgb(query)]), 3)
    for line, score, item in zip(lines[2:5], expected_scores[0], expected_ids[0]):
        rank, printed_score, label, printed_id, path = line.split()
        assert (printed_score, label, int(printed_id), path) == (f"{score:.4f}", "red", item, gallery.items[item].path)


def test_user_errors_exit_2_with_a_message(gallery_dir, workspace, tmp_path, capsys):
    cases = [
        (["eval", "--index", str(tmp_path / "nope")], "gallery folder not found"),
        (["index", "--model", str(workspace["model"]), "--dataset", "folder", "--out", str(tmp_path / "x")],
         "--dataset needs --data-root"),
        (["index", "--model", str(tmp_path / "none.onnx"), "--images", str(workspace["root"] / "images"),
          "--out", str(tmp_path / "x")], "ONNX model not found"),
        (["index", "--model", str(workspace["model"]), "--dataset", "nosuch", "--data-root", str(tmp_path),
          "--out", str(tmp_path / "x")], "unknown dataset"),
        (["eval", "--index", str(gallery_dir), "--queries-split", "query", "--data-root", str(tmp_path)],
         "built from an image folder"),
        (["search", "--index", str(gallery_dir), str(workspace["root"] / "images" / "red" / "broken.jpg")],
         "cannot load 1 of 1 query images"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--ids", "1,x"],
         "--ids: ids must be item ids (whole numbers) separated by commas, got '1,x'"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--ids", ""], "--ids: ids must be item ids"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--id-range", "7"],
         "--id-range: an id range must be START-STOP"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--id-range", "7-3"],
         "--id-range: an id range START-STOP needs START <= STOP, got '7-3'"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--output", str(tmp_path / "r.txt")],
         "cannot tell the format of"),
        (["search", "--index", str(gallery_dir), str(workspace["queries"][0]), "--format", "csv"],
         "--format goes with --output"),
        (["search", "--index", str(gallery_dir), str(tmp_path / "no-such-folder") + "/"], "cannot load 1 of 1"),
    ]  # fmt: skip
    for argv, message in cases:
        assert sct(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "x").exists()


def test_mismatched_gallery_is_refused(workspace, tmp_path, capsys):
    out = tmp_path / "g"
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["root"] / "queries"),
                "--out", str(out)]) == 0  # fmt: skip
    make_tiny_model(out / "model.onnx", seed=5)
    capsys.readouterr()
    assert sct(["eval", "--index", str(out)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_bad_flag_values_are_argparse_errors(gallery_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sct(["eval", "--index", str(gallery_dir), "--k", "0"])
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err


def _brute_force_top(gallery: Gallery, paths: list, k: int, allowed: np.ndarray | None = None):
    """Each query's top k (ids, scores) by numpy over the gallery's stored vectors, only ``allowed`` ids if given."""
    queries = gallery.embedder.embed_images(
        [load_rgb(path, min_side=gallery.embedder.preprocessing.decode_side) for path in paths]
    )
    vectors = gallery.vectors()[:]
    candidates = np.arange(len(vectors)) if allowed is None else allowed
    scores = queries @ vectors[candidates].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return candidates[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def query_folder(workspace, tmp_path_factory):
    """The query images in class subfolders, plus two unreadable ones."""
    folder = tmp_path_factory.mktemp("search") / "queries"
    for path in workspace["queries"]:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / path.parent.name / path.name).write_bytes(path.read_bytes())
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "green" / "empty.png").write_bytes(b"")
    return folder


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_search_a_folder_writes_results_equal_to_brute_force(gallery_dir, query_folder, tmp_path, capsys, fmt):
    out = tmp_path / f"results.{fmt}"
    k = 5
    assert sct(["search", "--index", str(gallery_dir), str(query_folder), "--output", str(out), "--k", str(k),
                "--batch-size", "3"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "error: cannot load 2 of 8 query images:" in err and f"wrote {out}: 6 queries" in err
    assert err.count("broken.jpg") == 1 and err.count("empty.png") == 1  # listed once, in the summary
    assert "embedding: 100%" in err and "8/8" in err  # the progress bar of more than one batch
    readable = sorted(p for p in query_folder.rglob("*.png") if p.stat().st_size)
    gallery = Gallery.load(gallery_dir)
    ids, scores = _brute_force_top(gallery, readable, k)
    if fmt == "csv":
        with out.open(newline="") as file:
            rows = list(csv.DictReader(file))
        assert list(rows[0]) == ["query", "rank", "score", "id", "label", "path"] and len(rows) == 6 * k
        queries = []
        for row in rows:  # a query's rows are consecutive, rank 1 first
            if row["rank"] == "1":
                queries.append({"query": row["query"], "results": []})
            assert row["query"] == queries[-1]["query"]
            queries[-1]["results"].append(row)
    else:
        queries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [q["query"] for q in queries] == [str(p) for p in readable]
    for query, expected_ids, expected_scores in zip(queries, ids, scores):
        results = query["results"]
        assert [int(r["rank"]) for r in results] == list(range(1, k + 1))
        assert [int(r["id"]) for r in results] == expected_ids.tolist()
        np.testing.assert_allclose([float(r["score"]) for r in results], expected_scores, atol=1e-5)
        assert [(r["label"], r["path"]) for r in results] == [
            (gallery.item(i).label, gallery.item(i).path) for i in expected_ids
        ]
        assert all(r["path"].endswith(".png") and "/" in r["path"] for r in results)


def test_search_output_format_flag_and_a_kept_file_when_nothing_is_readable(gallery_dir, workspace, tmp_path, capsys):
    out = tmp_path / "results.txt"
    query = workspace["queries"][0]
    assert sct(["search", "--index", str(gallery_dir), str(query), "--output", str(out), "--format", "jsonl"]) == 0
    assert [json.loads(line)["query"] for line in out.read_text().splitlines()] == [str(query)]
    before = out.read_bytes()
    broken = workspace["root"] / "images" / "red" / "broken.jpg"
    assert sct(["search", "--index", str(gallery_dir), str(broken), "--output", str(out), "--format", "csv"]) == 2
    assert f"{out} not written" in capsys.readouterr().err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["results.txt"]


FILTERS = [
    (["--label", "red"], lambda ids, labels: labels == "red"),
    (["--label", "red", "--label", "blue"], lambda ids, labels: (labels == "red") | (labels == "blue")),
    (["--exclude-label", "red"], lambda ids, labels: labels != "red"),
    (["--ids", "1,4,9", "--ids", "11"], lambda ids, labels: np.isin(ids, [1, 4, 9, 11])),
    (["--id-range", "2-7"], lambda ids, labels: (ids >= 2) & (ids < 7)),
    (["--id-range", "0-8", "--exclude-label", "green"], lambda ids, labels: (ids < 8) & (labels != "green")),
]


@pytest.mark.parametrize(("flags", "allow"), FILTERS)
def test_filtered_search_equals_brute_force_over_the_allowed_items(gallery_dir, query_folder, tmp_path, flags, allow):
    out = tmp_path / "results.jsonl"
    queries = sorted(p for p in query_folder.rglob("*.png") if p.stat().st_size)
    assert sct(["search", "--index", str(gallery_dir), *map(str, queries), "--output", str(out), "--k", "4",
                *flags]) == 0  # fmt: skip
    gallery = Gallery.load(gallery_dir)
    all_ids = np.arange(len(gallery.items))
    allowed = all_ids[allow(all_ids, gallery.labels)]
    ids, scores = _brute_force_top(gallery, queries, 4, allowed)
    for line, expected_ids, expected_scores in zip(out.read_text().splitlines(), ids, scores):
        results = json.loads(line)["results"]
        assert [r["id"] for r in results] == expected_ids.tolist()
        np.testing.assert_allclose([r["score"] for r in results], expected_scores, atol=1e-5)
