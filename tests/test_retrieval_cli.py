"""``sct index`` / ``eval`` / ``search`` through the handlers that ``register`` installs."""

from __future__ import annotations

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
    lines = capsys.readouterr().out.splitlines()
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
         "cannot load image"),
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
