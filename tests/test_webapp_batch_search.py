"""POST /api/search with several images (each query's results equal its own search; the batch's limits; a
corrupt image named), each result's file name, and the filter parameters (vs brute force over the allowed items)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import decode_rgb
from retrieval.embedder import OnnxEmbedder
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import create_app

MAX_UPLOAD = 100_000
MAX_BATCH_BYTES = 250_000
MAX_BATCH = 3
MAX_K = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_search")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=4)
    embedder = OnnxEmbedder(model)
    embeddings = build_gallery_of(root / "index_data" / "colors", model, paths, embedder)
    app = create_app(
        [root / "index_data" / "colors"],
        max_upload_bytes=MAX_UPLOAD,
        max_batch=MAX_BATCH,
        max_batch_bytes=MAX_BATCH_BYTES,
        default_k=4,
        max_k=MAX_K,
    )
    labels = np.array([p.parent.name for p in paths])
    return {"client": app.test_client(), "embedder": embedder, "embeddings": embeddings, "labels": labels,
            "paths": paths, "root": root}  # fmt: skip


def post_images(client, images: list[tuple[bytes, str]], **fields):
    """A search of several images, each (bytes, upload filename), in this order."""
    form: dict = {key: value for key, value in fields.items()}
    form["image"] = [(io.BytesIO(data), filename) for data, filename in images]
    return client.post("/api/search", data=form, content_type="multipart/form-data")


IMAGES = [(png_bytes((200, 40, 40), seed=1), "red.png"), (png_bytes((40, 200, 40), seed=2), "green one.png"),
          (png_bytes((40, 40, 200), seed=3), "blue.jpg")]  # fmt: skip


def test_a_batch_gives_each_query_the_results_of_its_own_search(served):
    client = served["client"]
    response = post_images(client, IMAGES, k=5)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"queries", "index", "timings_ms"} and body["index"] == "colors"
    assert [query["file"] for query in body["queries"]] == [filename for _, filename in IMAGES]
    for query, (data, filename) in zip(body["queries"], IMAGES):
        single = post_search(client, data, filename=filename, k=5).get_json()
        assert [r["id"] for r in query["results"]] == [r["id"] for r in single["results"]]
        np.testing.assert_allclose([r["score"] for r in query["results"]], [r["score"] for r in single["results"]],
                                   atol=1e-5)  # fmt: skip
        assert [r["label"] for r in query["results"]] == [r["label"] for r in single["results"]]
        assert query["results"][0]["label"] == filename.split(".")[0].split()[0]
        for result in query["results"]:  # each query was kept for its heatmaps
            assert result["heatmap_url"] == f"/api/heatmap?query={query['query_id']}&item={result['id']}&index=colors"
        with client.get(query["results"][0]["heatmap_url"]) as heatmap:
            assert heatmap.status_code == 200 and heatmap.mimetype == "image/png"
    assert len({query["query_id"] for query in body["queries"]}) == len(IMAGES)


def test_a_one_image_search_keeps_its_response_shape(served):
    body = post_images(served["client"], IMAGES[:1]).get_json()
    assert set(body) == {"results", "index", "query_id", "query_item", "timings_ms"}
    assert set(body["results"][0]) == {"id", "score", "label", "file", "image_url", "heatmap_url", "pair_url"}


def test_results_name_each_items_file_without_its_folder(served):
    for response in (post_images(served["client"], IMAGES), post_search(served["client"], item="3", k=MAX_K)):
        body = response.get_json()
        assert str(served["root"]) not in response.get_data(as_text=True)  # no server path in the answer
        for results in [query["results"] for query in body.get("queries", [])] or [body["results"]]:
            assert results
            for result in results:
                assert result["file"] == os.path.basename(served["paths"][result["id"]])


@pytest.mark.parametrize(
    ("images", "status", "message"),
    [
        (IMAGES + IMAGES[:1], 400, "too many images: the file field 'image' holds 4; at most 3 images and "),
        ([IMAGES[0], (b"not an image", "bad.png"), IMAGES[2]], 400,
         "cannot read image 2 of 3 ('bad.png'): not a recognised image format"),
        ([IMAGES[0], IMAGES[1], (png_bytes(size=(64, 64))[:150], "cut.png")], 400,
         "cannot read image 3 of 3 ('cut.png'): truncated or corrupt"),
        ([IMAGES[0], (b"", "")], 400, "cannot read image 2 of 2 (''): empty upload"),
        ([IMAGES[0], (IMAGES[1][0] + bytes(MAX_UPLOAD), "big.png")], 413,
         "upload too large: the limit is 100,000 bytes per image (image 2 of 2 ('big.png'))"),
        ([(IMAGES[i][0] + bytes(MAX_UPLOAD - 2000), f"{i}.png") for i in range(3)], 413,
         "upload too large: the images total more than the limit, at most 3 images and 250,000 bytes in all"),
    ],
)  # fmt: skip
def test_a_bad_batch_is_refused_naming_the_image_or_the_limit(served, images, status, message):
    response = post_images(served["client"], images)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert post_images(served["client"], IMAGES).status_code == 200  # the server keeps serving


def test_a_body_over_the_batch_limit_is_413_naming_both_limits(served):
    response = post_images(served["client"], [(bytes(MAX_BATCH_BYTES + 70_000), "huge.png")])
    assert response.status_code == 413
    assert response.get_json()["error"] == (
        "upload too large: the limit is 100,000 bytes per image, at most 3 images and 250,000 bytes in all per search"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ids": "1,x"}, "parameter 'ids': ids must be item ids (whole numbers) separated by commas, got '1,x'"),
        ({"ids": ""}, "parameter 'ids': ids must be item ids"),
        ({"ids": "-1"}, "parameter 'ids': ids must be item ids"),
        ({"ids": ["1,2", "3;4"]}, "parameter 'ids': ids must be item ids (whole numbers) separated by commas, got '3;4'"),
        ({"ids": "9" * 19}, "parameter 'ids': ids must be item ids"),
        ({"id_range": "3"}, "parameter 'id_range': an id range must be START-STOP with whole numbers (STOP excluded)"),
        ({"id_range": "a-b"}, "parameter 'id_range': an id range must be START-STOP"),
        ({"id_range": "7-3"}, "parameter 'id_range': an id range START-STOP needs START <= STOP, got '7-3'"),
        ({"id_range": ["0-3", "4-6"]}, "parameter 'id_range' is given 2 times; give one range"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("search", ["upload", "batch", "item"])
def test_malformed_filter_parameters_are_400(served, fields, message, search):
    client = served["client"]
    if search == "upload":
        response = post_images(client, IMAGES[:1], **fields)
    elif search == "batch":
        response = post_images(client, IMAGES, **fields)
    else:
        response = client.post("/api/search", data={"item": "2", **fields}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert message in response.get_json()["error"]


FILTERS = [
    ({"label": "red"}, lambda ids, labels: labels == "red"),
    ({"label": ["red", "blue"]}, lambda ids, labels: (labels == "red") | (labels == "blue")),
    ({"exclude_label": "red"}, lambda ids, labels: labels != "red"),
    ({"exclude_label": ["red", "green"]}, lambda ids, labels: labels == "blue"),
    ({"ids": "1,4,9,11"}, lambda ids, labels: np.isin(ids, [1, 4, 9, 11])),
    ({"ids": ["1,4", "9"]}, lambda ids, labels: np.isin(ids, [1, 4, 9])),
    ({"id_range": "2-7"}, lambda ids, labels: (ids >= 2) & (ids < 7)),
    ({"id_range": "0-8", "exclude_label": "green"}, lambda ids, labels: (ids < 8) & (labels != "green")),
    ({"label": "nothing such"}, lambda ids, labels: np.zeros(len(ids), dtype=bool)),
]


def _allowed_top(served, query: np.ndarray, k: int, allow, leave_out: int | None = None):
    """The top k ids and scores by numpy over the items ``allow`` keeps (and not ``leave_out``)."""
    embeddings = served["embeddings"]
    ids = np.arange(len(embeddings))
    allowed = ids[allow(ids, served["labels"]) & (ids != leave_out)]
    scores = embeddings[allowed] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return allowed[order].tolist(), scores[order]


def _embedded(served, data: bytes) -> np.ndarray:
    embedder = served["embedder"]
    return embedder.embed_images([decode_rgb(data, min_side=embedder.preprocessing.decode_side)])[0]


@pytest.mark.parametrize(("fields", "allow"), FILTERS)
def test_filtered_upload_and_batch_searches_equal_brute_force(served, fields, allow):
    for images in (IMAGES[:1], IMAGES):
        body = post_images(served["client"], images, k=5, **fields).get_json()
        for query, (data, _) in zip(body.get("queries") or [body], images):
            ids, scores = _allowed_top(served, _embedded(served, data), 5, allow)
            assert [r["id"] for r in query["results"]] == ids
            np.testing.assert_allclose([r["score"] for r in query["results"]], scores, atol=1e-5)


@pytest.mark.parametrize(("fields", "allow"), FILTERS)
def test_filtered_item_search_equals_brute_force(served, fields, allow):
    item = 5
    response = served["client"].post("/api/search", data={"item": str(item), "k": "5", **fields},
                                     content_type="multipart/form-data")  # fmt: skip
    ids, scores = _allowed_top(served, served["embeddings"][item], 5, allow, leave_out=item)
    results = response.get_json()["results"]
    assert [r["id"] for r in results] == ids
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
