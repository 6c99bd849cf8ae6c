"""Live reindex: a served gallery folder rebuilt by ``build_gallery`` is served at the next request, without
a restart; a folder that does not load leaves the old gallery serving; concurrent searches never fail."""

from __future__ import annotations

import logging
import shutil
import threading

import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from core.atomic import atomic_directory
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import MODEL_FILE
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import create_app


@pytest.fixture
def setup(tmp_path):
    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=3)
    by_label = {label: [p for p in paths if p.parent.name == label] for label in ("red", "green", "blue")}
    embedder = OnnxEmbedder(model)

    def rebuild(*labels: str) -> None:
        build_gallery_of(tmp_path / "colors", model, [p for label in labels for p in by_label[label]], embedder)

    rebuild("red", "green")
    app = create_app([tmp_path / "colors"], default_k=3)
    return {"app": app, "client": app.test_client(), "rebuild": rebuild, "folder": tmp_path / "colors"}


def labels_found(client) -> set[str]:
    response = post_search(client, png_bytes(color=(30, 40, 210)), k=3)  # a blue query
    assert response.status_code == 200, response.get_json()
    return {result["label"] for result in response.get_json()["results"]}


def test_a_rebuilt_folder_is_served_without_restart(setup):
    client = setup["client"]
    assert "blue" not in labels_found(client)
    assert client.get("/healthz").get_json()["indexes"][0]["count"] == 6
    setup["rebuild"]("blue", "green", "red")
    assert labels_found(client) == {"blue"}
    assert client.get("/healthz").get_json()["indexes"][0]["count"] == 9


def test_a_folder_that_does_not_load_leaves_the_old_gallery_serving(setup, tmp_path, caplog):
    client = setup["client"]
    with atomic_directory(setup["folder"]) as staging:  # a rebuild whose model is not the indexed one
        shutil.copytree(setup["folder"], staging, dirs_exist_ok=True)
        make_tiny_model(staging / MODEL_FILE, seed=1)
    with caplog.at_level(logging.ERROR, logger="webapp.live"):
        for _ in range(3):
            assert labels_found(client) <= {"red", "green"}
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once, not at every request
    assert "does not load" in errors[0] and "sha256 mismatch" in errors[0]
    setup["rebuild"]("blue")  # a good rebuild is picked up again
    assert labels_found(client) == {"blue"}


def test_searches_never_fail_while_the_folder_is_swapped(setup):
    app = setup["app"]
    failures: list[str] = []
    done = threading.Event()
    searched = [0]

    def keep_searching() -> None:
        client = app.test_client()
        while not done.is_set():
            response = post_search(client, png_bytes(), k=3)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.get_data(as_text=True)}")
            searched[0] += 1

    threads = [threading.Thread(target=keep_searching) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for labels in [("blue", "green"), ("red", "green", "blue"), ("green",), ("red", "blue"), ("blue",)]:
            setup["rebuild"](*labels)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert failures == [] and searched[0] > 10
    client = app.test_client()
    assert labels_found(client) == {"blue"} and client.get("/healthz").get_json()["indexes"][0]["count"] == 3
