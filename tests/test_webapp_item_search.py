""" "More like this": POST /api/search with item=ID (vs brute force over the stored vectors, the item left out),
and pairs whose query is a gallery item (query_item=ID), which need no state kept by the server process."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import load_rgb
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import Gallery, GalleryItem, build_gallery
from retrieval.heatmaps import BAR_PANEL
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from tests.test_webapp_metrics import scrape, stage_count, value
from webapp import create_app

MAX_K = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("item_search")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=4)
    embedder = OnnxEmbedder(model)
    build_gallery_of(root / "index_data" / "colors", model, paths, embedder)
    reds = [p for p in paths if p.parent.name == "red"]
    build_gallery_of(root / "index_data" / "reds", model, reds, embedder)
    lost = root / "images" / "lost.png"
    lost.write_bytes(paths[0].read_bytes())
    build_gallery_of(root / "index_data" / "lost", model, [lost, paths[1]], embedder)
    lost.unlink()
    folders = [root / "index_data" / name for name in ("colors", "reds", "lost")]
    app = create_app(folders, default_k=4, max_k=MAX_K)
    return {"app": app, "client": app.test_client(), "root": root, "folders": folders, "paths": paths}


def brute_force(folder, item: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best items by inner product with item ``item``'s stored vector, the item itself left out."""
    vectors = Gallery.load(folder).embeddings()
    scores = vectors @ vectors[item]
    order = [i for i in np.argsort(-scores, kind="stable") if i != item][:k]
    return np.array(order), scores[order]


def item_search(client, item, **fields):
    return post_search(client, item=item, **fields)


@pytest.mark.parametrize(
    ("name", "item", "k"), [("colors", 0, 1), ("colors", 5, 4), ("colors", 11, 11), ("reds", 2, 3)]
)
def test_item_search_matches_brute_force_without_the_item(served, name, item, k):
    response = item_search(served["client"], item, k=k, index=name)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    ids, scores = brute_force(served["root"] / "index_data" / name, item, k)
    assert [r["id"] for r in body["results"]] == ids.tolist()
    assert item not in [r["id"] for r in body["results"]]
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores, atol=1e-5)
    gallery = served["app"].extensions["sct"].indexes[name].current()
    assert body["index"] == name and body["query_id"] is None
    assert body["query_item"] == {
        "id": item,
        "label": gallery.items[item].label,
        "image_url": f"/api/items/{item}/image?index={name}",
    }
    for result in body["results"]:
        assert result["label"] == gallery.items[result["id"]].label
        assert result["image_url"] == f"/api/items/{result['id']}/image?index={name}"
        assert result["heatmap_url"] == f"/api/heatmap?query_item={item}&item={result['id']}&index={name}"
        assert result["pair_url"] == f"/pair?query_item={item}&item={result['id']}&index={name}"
    assert set(body["timings_ms"]) == {"search", "render", "total"}


def test_item_search_keeps_no_query_and_k_above_the_gallery_size(served):
    client = served["client"]
    kept = value(scrape(client), "sct_queries_kept")
    body = item_search(client, 1, k=MAX_K, index="reds").get_json()
    assert len(body["results"]) == 3  # 4 reds, the query left out
    body = item_search(client, 3).get_json()  # default gallery and K
    assert body["index"] == "colors" and len(body["results"]) == 4
    found = scrape(client)
    assert value(found, "sct_queries_kept") == kept and stage_count(found, "search") >= 2


def test_an_upload_search_says_it_has_no_query_item(served):
    body = post_search(served["client"], png_bytes()).get_json()
    assert body["query_item"] is None and body["query_id"]


@pytest.mark.parametrize(
    ("fields", "with_image", "status", "message"),
    [
        ({}, False, 400, "missing file field 'image' (send the image as multipart/form-data), or field 'item'"),
        ({"item": "0"}, True, 400, "send the file field 'image' or the field 'item', not both"),
        ({"item": "abc"}, False, 400, "parameter 'item' must be a gallery item id (an integer from 0), got 'abc'"),
        ({"item": "-1"}, False, 400, "parameter 'item' must be a gallery item id"),
        ({"item": "1.0"}, False, 400, "parameter 'item' must be a gallery item id"),
        ({"item": ""}, False, 400, "parameter 'item' must be a gallery item id (an integer from 0), got ''"),
        ({"item": "9" * 19}, False, 400, "parameter 'item' must be a gallery item id"),
        ({"item": "12"}, False, 404, "no item 12 in gallery 'colors' (12 items)"),
        ({"item": "4", "index": "reds"}, False, 404, "no item 4 in gallery 'reds' (4 items)"),
        ({"item": "0", "index": "nope"}, False, 400, "unknown index 'nope'"),
        ({"item": "0", "k": "0"}, False, 400, "k must be between 1 and 12"),
    ],
)
def test_bad_item_searches_are_4xx_json(served, fields, with_image, status, message):
    response = post_search(served["client"], png_bytes() if with_image else None, **fields)
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_an_item_given_twice_is_refused(served):
    response = served["client"].post("/api/search", data={"item": ["1", "2"]}, content_type="multipart/form-data")
    assert response.status_code == 400 and "the field 'item' is given 2 times" in response.get_json()["error"]


def test_an_item_search_works_as_a_plain_form_post(served):
    response = served["client"].post("/api/search", data={"item": "4", "k": "2"})
    assert response.status_code == 200 and len(response.get_json()["results"]) == 2


def test_item_pairs_match_the_item_search_and_need_no_kept_query(served):
    body = item_search(served["client"], 5, k=3).get_json()
    other_worker = create_app(served["folders"]).test_client()  # knows no query of the first app
    for result in body["results"]:
        pair = other_worker.get(f"/api/pair?query_item=5&item={result['id']}").get_json()
        assert pair["index"] == "colors" and pair["query_id"] is None
        assert pair["query_item"] == body["query_item"]
        assert pair["item"] == {"id": result["id"], "label": result["label"], "image_url": result["image_url"]}
        assert pair["cosine"] == pytest.approx(result["score"], abs=1e-5)  # both items re-embedded from their files
        for cells in (pair["query_cells"], pair["item_cells"]):
            assert np.array(cells).shape == (4, 4)
            assert np.sum(cells) == pytest.approx(pair["cosine"], abs=1e-5)
        assert pair["pair_url"] == result["pair_url"]
        assert pair["item_heatmap_url"] == result["heatmap_url"] + "&side=item"
        assert pair["query_heatmap_url"] == result["heatmap_url"] + "&side=query"


@pytest.mark.parametrize("side", ["item", "query"])
def test_item_pair_heatmaps_are_pngs(served, side):
    response = served["client"].get(f"/api/heatmap?query_item=2&item=7&index=colors&side={side}")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.data)).size == (256 + BAR_PANEL, 256)
    assert response.headers["Cache-Control"] == "no-store"


def test_item_pair_page_shows_the_query_item_and_more_like_this_links(served):
    gallery = served["app"].extensions["sct"].indexes["colors"].current()
    page = served["client"].get("/pair?query_item=2&item=7&index=colors")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for needle in (
        'src="/api/heatmap?query_item=2&amp;item=7&amp;index=colors&amp;side=query"',
        'src="/api/heatmap?query_item=2&amp;item=7&amp;index=colors&amp;side=item"',
        f"Query · {gallery.items[2].label}",
        f'id="pair-label" title="{gallery.items[7].label}"',
        'id="more-like-item" href="/?item=7&amp;index=colors"',
        'id="more-like-query" href="/?item=2&amp;index=colors"',
        'href="/api/items/2/image?index=colors"',
    ):
        assert needle in html


def test_a_kept_query_pair_page_has_a_more_like_this_result_link_only(served):
    body = post_search(served["client"], png_bytes(), k=2).get_json()
    html = served["client"].get(body["results"][0]["pair_url"]).get_data(as_text=True)
    assert f'id="more-like-item" href="/?item={body["results"][0]["id"]}&amp;index=colors"' in html
    assert 'id="more-like-query"' not in html


ITEM_PAIR_ERRORS = [
    ("query=abc&query_item=1&item=0", 400, "parameter 'query' (a search's query_id) or 'query_item'"),
    ("query_item=x&item=0", 400, "parameter 'query_item' must be a gallery item id (an integer from 0), got 'x'"),
    ("query_item=&item=0", 400, "parameter 'query_item' must be a gallery item id"),
    ("query_item=-3&item=0", 400, "parameter 'query_item' must be a gallery item id"),
    ("query_item=1", 400, "parameter 'item' must be a gallery item id"),
    ("query_item=12&item=0", 404, "no item 12 in gallery 'colors'"),
    ("query_item=0&item=12", 404, "no item 12 in gallery 'colors'"),
    ("query_item=1&item=0&index=reds", 200, None),
    ("query_item=1&item=0&index=nope", 404, "unknown index 'nope'"),
    ("query_item=0&item=1&index=lost", 404, "image file of item 0 in gallery 'lost' is missing"),
    ("query_item=1&item=0&index=lost", 404, "image file of item 0 in gallery 'lost' is missing"),
    ("item=0", 400, "missing parameter 'query' (the query_id of a search response), or 'query_item'"),
]


@pytest.mark.parametrize(
    ("endpoint", "params", "status", "message"),
    [(endpoint, *case) for endpoint in ("/api/pair", "/api/heatmap") for case in ITEM_PAIR_ERRORS],
)
def test_bad_item_pair_parameters_are_4xx_json(served, endpoint, params, status, message):
    response = served["client"].get(f"{endpoint}?{params}")
    assert response.status_code == status
    if message is not None:
        assert message in response.get_json()["error"]


def test_a_bad_item_pair_page_is_an_html_error_page(served):
    response = served["client"].get("/pair?query_item=99&item=0")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "no item 99 in gallery &#39;colors&#39;" in response.get_data(as_text=True)


def test_search_page_offers_item_searches(served):
    html = served["client"].get("/").get_data(as_text=True)
    assert 'data-default-index="colors"' in html and 'id="query-caption"' in html
    with served["client"].get("/?item=3&index=reds") as response:  # the page itself; app.js runs the search
        assert response.status_code == 200


@pytest.mark.parametrize("storage", ["memory", "ondisk"])
def test_item_search_on_an_ivf_gallery(tmp_path, storage, single_thread_faiss):
    """An IVF index reads an item's vector back through its id → list map, built on the first item search."""
    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=12)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(id=i, path=str(p), label=p.parent.name) for i, p in enumerate(paths)]
    folder = build_gallery(
        tmp_path / "ivf", embeddings, items, model, dataset="synthetic", split="test", index_type="ivf-flat",
        storage=storage, nlist=2, nprobe=2,
    )  # fmt: skip
    client = create_app([folder], max_k=40).test_client()
    for item in (0, 17, 35):
        body = item_search(client, item, k=35).get_json()
        expected, scores = brute_force(folder, item, 35)  # nprobe = nlist: an exact search
        assert [r["id"] for r in body["results"]] == expected.tolist()
        np.testing.assert_allclose([r["score"] for r in body["results"]], scores, atol=1e-5)
