"""train → export → index → eval → search through the real CLI and Flask app, on synthetic images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.gallery import Gallery
from sct.cli import main
from webapp import create_app

# Eight classes, each a distinct colour and stripe direction; the folder reader
# trains on the first four and keeps the last four for testing.
CLASSES = {
    "a_red": ((210, 40, 40), 0),
    "b_green": ((40, 190, 60), 1),
    "c_blue": ((40, 60, 200), 0),
    "d_yellow": ((220, 210, 50), 1),
    "e_cyan": ((40, 200, 210), 0),
    "f_magenta": ((200, 50, 200), 1),
    "g_grey": ((128, 128, 128), 0),
    "h_orange": ((240, 140, 30), 1),
}


def _write_images(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name, (colour, vertical) in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 31, size=(36, 36, 3)), 0, 255)
            stripes = (np.arange(36) // 4) % 2 == 0
            if vertical:
                pixels[:, stripes] //= 2
            else:
                pixels[stripes] //= 2
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.mark.timeout(120)
def test_pipeline_from_training_to_a_search_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run, gallery_dir = tmp_path / "data", tmp_path / "run", tmp_path / "index_data" / "synthetic"
    _write_images(data)

    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-root",
                str(data),
                "--out",
                str(run),
                "--arch",
                "resnet18",
                "--pretrained",
                "none",
                "--dim",
                "16",
                "--image-size",
                "32",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--images-per-class",
                "2",
                "--lr",
                "0.01",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line.get("type") == "eval"] == [0, 1]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)

    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(run / "model.onnx")]) == 0
    assert (
        main(
            [
                "index",
                "--model",
                str(run / "model.onnx"),
                "--dataset",
                "folder",
                "--data-root",
                str(data),
                "--split",
                "test",
                "--out",
                str(gallery_dir),
            ]
        )
        == 0
    )
    assert main(["eval", "--index", str(gallery_dir), "--k", "1", "2"]) == 0
    evaluation = json.loads((gallery_dir / "eval.json").read_text())
    gallery = Gallery.load(gallery_dir)
    assert len(gallery.items) == evaluation["queries"] == 24  # four test classes × six images
    # leave-one-out Recall@1 and @2 by brute force over the stored vectors
    vectors, labels = gallery.embeddings(), np.array([item.label for item in gallery.items])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    hits = labels[np.argsort(-similarity, axis=1, kind="stable")[:, :2]] == labels[:, None]
    assert evaluation["recall@1"] == pytest.approx(hits[:, 0].mean())
    assert evaluation["recall@2"] == pytest.approx(hits.any(axis=1).mean())
    query_item = gallery.items[5]
    client = create_app([gallery_dir]).test_client()
    upload = Path(query_item.path).read_bytes()
    response = client.post("/api/search", data={"image": (io.BytesIO(upload), "q.png"), "k": "3"})
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 3
    # The query is itself in the gallery: it must come back first, with cosine ≈ 1.
    assert results[0]["id"] == query_item.id and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["label"] == query_item.label
    assert client.get(results[0]["image_url"]).data == upload
