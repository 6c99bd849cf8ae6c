"""``sct index --add`` and ``--remove`` on real image files: only new images are embedded, ids stay, and
``sct eval`` afterwards equals ``sct eval`` of a gallery built fresh from the same images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.gallery import Gallery
from sct.cli import main

COLORS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200), "grey": (128, 128, 128)}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    make_tiny_model(tmp_path / "model.onnx", image_size=32, dim=16)
    make_color_images(tmp_path / "photos", classes={k: COLORS[k] for k in ("red", "green")}, per_class=5, seed=0)
    make_color_images(tmp_path / "later", classes={"blue": COLORS["blue"]}, per_class=4, seed=1)
    make_color_images(tmp_path / "elsewhere", classes={"x": COLORS["grey"]}, per_class=2, seed=2)
    assert main(["index", "--model", str(tmp_path / "model.onnx"), "--images", str(tmp_path / "photos"),
                 "--out", str(tmp_path / "g")]) == 0  # fmt: skip
    return tmp_path


def test_add_embeds_only_new_images_and_remove_keeps_the_other_ids(workspace: Path, capsys) -> None:
    gallery_dir, photos = workspace / "g", workspace / "photos"
    before = {item.id: item.path for item in Gallery.load(gallery_dir).items}
    capsys.readouterr()
    shutil.copytree(workspace / "later" / "blue", photos / "blue")
    assert main(["index", "--add", "--images", str(photos), "--out", str(gallery_dir)]) == 0
    out, err = capsys.readouterr()
    assert "10 of 14 images are in the gallery already" in err and "added 4 item(s), ids 10..13" in out
    assert main(["index", "--add", "--images", str(photos), "--out", str(gallery_dir)]) == 0
    assert "nothing to add" in capsys.readouterr().out

    listed = workspace / "new.txt"
    listed.write_text(
        f"# two grey images, labelled here\n{workspace}/elsewhere/x/0.png\tgrey\n{workspace}/elsewhere/x/1.png\n"
    )
    assert main(["index", "--add", "--files", str(listed), "--out", str(gallery_dir)]) == 0
    (workspace / "gone.txt").write_text("3\n11  # a blue one\n\n")
    assert main(["index", "--remove-file", str(workspace / "gone.txt"), "--out", str(gallery_dir)]) == 0
    assert main(["index", "--remove", "0", "--out", str(gallery_dir)]) == 0

    gallery = Gallery.load(gallery_dir)
    assert [item.id for item in gallery.items] == [1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15]
    assert all(gallery.item(i).path == path for i, path in before.items() if i not in (0, 3))
    assert [gallery.item(14).label, gallery.item(15).label] == ["grey", "x"]  # a listed label, else the folder's
    assert str((workspace / "elsewhere" / "x").resolve()) in gallery.manifest["image_roots"]
    assert [entry["change"] for entry in gallery.manifest["history"]] == ["build", "add", "add", "remove", "remove"]

    capsys.readouterr()
    assert main(["search", "--index", str(gallery_dir), str(photos / "blue" / "2.png"), "--k", "1"]) == 0
    assert "  12  " in capsys.readouterr().out  # the image's own item, by the id it was given when added


def test_eval_after_changes_equals_eval_of_a_fresh_build(workspace: Path, capsys) -> None:
    gallery_dir = workspace / "g"
    shutil.copytree(workspace / "later" / "blue", workspace / "photos" / "blue")
    assert main(["index", "--add", "--images", str(workspace / "photos"), "--out", str(gallery_dir)]) == 0
    assert main(["index", "--remove", "2", "7", "12", "--out", str(gallery_dir)]) == 0
    changed = Gallery.load(gallery_dir)
    listed = workspace / "final.txt"  # the same images, labels and order, for a fresh build
    listed.write_text("".join(f"{item.path}\t{item.label}\n" for item in changed.items))
    fresh_dir = workspace / "fresh"
    assert (
        main(["index", "--model", str(workspace / "model.onnx"), "--files", str(listed), "--out", str(fresh_dir)]) == 0
    )
    for directory in (gallery_dir, fresh_dir):
        assert main(["eval", "--index", str(directory), "--save-top", "3"]) == 0
    ours, theirs = (json.loads((d / "eval.json").read_text()) for d in (gallery_dir, fresh_dir))
    same = {"created": None, "gallery": None}
    assert ours | same == theirs | same and ours["queries"] == 11
    assert np.array_equal(Gallery.load(fresh_dir).embeddings(), changed.embeddings())
    with np.load(gallery_dir / "eval_queries.npz") as our_file, np.load(fresh_dir / "eval_queries.npz") as their_file:
        ids = changed.items.ids  # the fresh gallery's rows, as ids of the changed one
        assert np.array_equal(our_file["query_item"], ids[their_file["query_item"]])
        assert np.array_equal(our_file["top_ids"], ids[their_file["top_ids"]])


def test_refused_changes_exit_2_and_name_the_problem(workspace: Path, capsys) -> None:
    gallery_dir = str(workspace / "g")
    other = make_tiny_model(workspace / "other.onnx", image_size=32, dim=16, seed=5)
    cases = [
        (["--remove", "3", "99", "--out", gallery_dir], "has no item 99"),
        (["--remove", "3", "--model", str(other), "--out", gallery_dir], "drop --model"),
        (["--add", "--images", str(workspace / "later"), "--model", str(other), "--out", gallery_dir], "not the model"),
        (
            ["--add", "--images", str(workspace / "later"), "--index-type", "hnsw", "--out", gallery_dir],
            "drop --index-type",
        ),
        (["--add", "--remove", "3", "--out", gallery_dir], "separate changes"),
        (["--remove-file", str(workspace / "nope.txt"), "--out", gallery_dir], "id list not found"),
        (["--add", "--files", str(workspace / "nope.txt"), "--out", gallery_dir], "file list not found"),
    ]
    before = {path.name: path.read_bytes() for path in (workspace / "g").iterdir()}
    for argv, message in cases:
        assert main(["index", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {path.name: path.read_bytes() for path in (workspace / "g").iterdir()} == before
