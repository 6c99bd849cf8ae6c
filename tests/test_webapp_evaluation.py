"""The evaluation page: eval.json as a table and a Recall@K curve, manifest facts, and what it says without one."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.embedder import OnnxEmbedder, file_sha256
from retrieval.evaluation import evaluate_gallery, save_eval
from retrieval.gallery import EVAL_FILE, Gallery
from tests.test_webapp_api import build_gallery_of
from webapp import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=3)
    for name in ("evaluated", "fresh"):
        build_gallery_of(root / "index_data" / name, model, paths, OnnxEmbedder(model))
    evaluated = root / "index_data" / "evaluated"
    results = evaluate_gallery(Gallery.load(evaluated), ks=(1, 2, 4), progress=False)
    save_eval(results, evaluated / EVAL_FILE)
    app = create_app([evaluated, root / "index_data" / "fresh"])
    return {"client": app.test_client(), "root": root, "results": results, "sha": file_sha256(model)}


def test_evaluation_page_shows_the_recall_table_curve_and_facts(served):
    page = served["client"].get("/evaluation?index=evaluated")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    results = served["results"]
    for k in (1, 2, 4):
        assert f"<tr><td>{k}</td><td>{100 * results[f'recall@{k}']:.2f}%</td></tr>" in html
    for needle in ("MAP@R", f"{100 * results['map@r']:.2f}%", "P@1", "<dd>9</dd>", "leave-one-out",
                   'src="/api/evaluation/recall.png?index=evaluated"', served["sha"], "Flat", "synthetic",
                   "Embedding dimension", 'aria-current="page">evaluated<'):  # fmt: skip
        assert needle in html
    assert "another model" not in html and "not been evaluated" not in html


def test_recall_curve_is_a_png(served):
    response = served["client"].get("/api/evaluation/recall.png?index=evaluated")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.data)).size[0] > 600


def test_without_eval_json_the_page_says_how_to_create_it(served):
    html = served["client"].get("/evaluation?index=fresh").get_data(as_text=True)
    folder = served["root"] / "index_data" / "fresh"
    assert "not been evaluated yet" in html and "sct eval --index DIR" in html
    assert str(folder) not in html  # the server's folders are not shown: the gallery's name is
    assert served["sha"] in html  # the manifest facts are there all the same
    response = served["client"].get("/api/evaluation/recall.png?index=fresh")
    assert response.status_code == 404 and "sct eval" in response.get_json()["error"]


def test_default_gallery_and_the_search_page_link(served):
    assert "evaluated" in served["client"].get("/evaluation").get_data(as_text=True)
    assert 'href="/evaluation?index=evaluated"' in served["client"].get("/").get_data(as_text=True)


def test_unknown_gallery(served):
    page = served["client"].get("/evaluation?index=nope")
    assert page.status_code == 404 and "unknown index &#39;nope&#39;" in page.get_data(as_text=True)
    response = served["client"].get("/api/evaluation/recall.png?index=nope")
    assert response.status_code == 404 and "unknown index 'nope'" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "cannot be read"), ('{"map@r": 0.5}', "holds no recall@K values"), ("[1, 2]", "holds no recall")],
)
def test_unreadable_eval_json_is_reported_not_a_500(served, tmp_path, content, message):
    folder = served["root"] / "index_data" / "fresh"
    (folder / EVAL_FILE).write_text(content)
    try:
        page = served["client"].get("/evaluation?index=fresh")
        assert page.status_code == 200 and message in page.get_data(as_text=True)
        response = served["client"].get("/api/evaluation/recall.png?index=fresh")
        assert response.status_code == 404 and message in response.get_json()["error"]
    finally:
        (folder / EVAL_FILE).unlink()


def test_figures_of_another_model_are_flagged(served):
    folder = served["root"] / "index_data" / "fresh"
    (folder / EVAL_FILE).write_text(json.dumps({**served["results"], "model_sha256": "0" * 64}))
    try:
        html = served["client"].get("/evaluation?index=fresh").get_data(as_text=True)
        assert "computed with another model (000000000000)" in html
    finally:
        (folder / EVAL_FILE).unlink()


def test_a_minimal_eval_json_is_enough(served):
    folder = served["root"] / "index_data" / "fresh"
    (folder / EVAL_FILE).write_text('{"recall@1": 0.5, "recall@10": 0.75}')
    try:
        html = served["client"].get("/evaluation?index=fresh").get_data(as_text=True)
        assert "<tr><td>10</td><td>75.00%</td></tr>" in html and "another model" not in html
        assert served["client"].get("/api/evaluation/recall.png?index=fresh").status_code == 200
    finally:
        (folder / EVAL_FILE).unlink()
