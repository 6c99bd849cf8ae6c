"""Pairs: a search keeps its query; the pair JSON, the heatmap PNGs and the pair page; their 4xx errors."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.embedder import OnnxEmbedder
from retrieval.heatmaps import BAR_PANEL
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from tests.test_webapp_metrics import exposed, scrape, stage_count
from webapp import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    model = make_tiny_model(root / "model.onnx")
    other_model = make_tiny_model(root / "other.onnx", seed=1)
    paths = make_color_images(root / "images", per_class=3)
    build_gallery_of(root / "index_data" / "colors", model, paths, OnnxEmbedder(model))
    build_gallery_of(root / "index_data" / "other", other_model, paths, OnnxEmbedder(other_model))
    lost = root / "images" / "lost.png"
    lost.write_bytes(paths[0].read_bytes())
    build_gallery_of(root / "index_data" / "lost", model, [lost, paths[1]], OnnxEmbedder(model))
    lost.unlink()
    app = create_app([root / "index_data" / name for name in ("colors", "other", "lost")])
    return {"app": app, "client": app.test_client(), "root": root, "paths": paths}


def search(client, index: str = "colors", k: int = 3) -> dict:
    response = post_search(client, png_bytes(), k=k, index=index)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_pair_cells_sum_to_the_cosine_of_the_search(served):
    client = served["client"]
    body = search(client)
    for result in body["results"]:
        pair = client.get(f"/api/pair?query={body['query_id']}&item={result['id']}").get_json()
        assert pair["index"] == "colors" and pair["query_id"] == body["query_id"]
        assert pair["item"] == {"id": result["id"], "label": result["label"], "image_url": result["image_url"]}
        assert pair["cosine"] == pytest.approx(result["score"], abs=1e-5)  # the item re-embedded from its file
        for cells in (pair["query_cells"], pair["item_cells"]):
            assert np.array(cells).shape == (4, 4)
            assert np.sum(cells) == pytest.approx(pair["cosine"], abs=1e-5)
        assert pair["scale"] == pytest.approx(np.abs([pair["query_cells"], pair["item_cells"]]).max())
        assert pair["pair_url"] == result["pair_url"]
        assert pair["item_heatmap_url"] == result["heatmap_url"] + "&side=item"


@pytest.mark.parametrize("side", ["item", "query"])
def test_heatmap_is_a_png_over_the_models_crop(served, side):
    body = search(served["client"])
    result = body["results"][1]
    url = result["heatmap_url"] + ("&side=query" if side == "query" else "")
    response = served["client"].get(url)
    assert response.status_code == 200 and response.mimetype == "image/png"
    picture = Image.open(io.BytesIO(response.data))
    assert picture.size == (256 + BAR_PANEL, 256)  # the tiny model's 16-px crop, enlarged 16×


def test_pair_page_shows_both_heatmaps_the_cosine_and_the_label(served):
    body = search(served["client"])
    result = body["results"][0]
    page = served["client"].get(result["pair_url"])
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    query_url = result["heatmap_url"].replace("&", "&amp;")
    for needle in ('id="query-heatmap"', 'id="item-heatmap"', f"{query_url}&amp;side=item",
                   f"{query_url}&amp;side=query", f'id="pair-cosine">{result["score"]:.3f}<',
                   'id="pair-label" title="red">red<', "/evaluation?index=colors"):  # fmt: skip
        assert needle in html


def test_results_of_the_default_gallery_pair_without_index(served):
    body = post_search(served["client"], png_bytes(), k=2).get_json()
    assert body["index"] == "colors"
    response = served["client"].get(f"/api/pair?query={body['query_id']}&item=0")
    assert response.status_code == 200 and response.get_json()["index"] == "colors"


PAIR_ERRORS = [
    ("item=0", 400, "missing parameter 'query'"),
    ("query=nope&item=0", 404, "unknown or expired query id 'nope'"),
    ("query={qid}", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=abc", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=-1", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=99", 404, "no item 99 in gallery 'colors'"),
    ("query={qid}&item=99999999999999999999", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=0&index=nope", 404, "unknown index 'nope'"),
    ("query={qid}&item=0&index=other", 409, "search again"),
    ("query={qid}&item=0&index=lost", 404, "image file of item 0 in gallery 'lost' is missing"),
]


@pytest.mark.parametrize(
    ("endpoint", "params", "status", "message"),
    [(endpoint, *case) for endpoint in ("/api/pair", "/api/heatmap") for case in PAIR_ERRORS]
    + [("/api/heatmap", "query={qid}&item=0&side=left", 400, "parameter 'side' must be one of item, query")],
)
def test_bad_pair_parameters_are_4xx_json(served, endpoint, params, status, message):
    query_id = search(served["client"])["query_id"]
    response = served["client"].get(f"{endpoint}?{params.format(qid=query_id)}")
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_bad_pair_page_is_an_html_error_page(served):
    response = served["client"].get("/pair?query=gone&item=0")
    assert response.status_code == 404 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "unknown or expired query id &#39;gone&#39;" in html and 'href="/"' in html


def test_queries_expire_and_only_the_latest_are_kept(served):
    app = create_app([served["root"] / "index_data" / "colors"], kept_queries=2, query_ttl_s=0.5)
    client = app.test_client()
    first, second, third = (search(client)["query_id"] for _ in range(3))
    assert client.get(f"/api/pair?query={first}&item=0").status_code == 404  # evicted: only 2 are kept
    assert client.get(f"/api/pair?query={third}&item=0").status_code == 200
    time.sleep(0.6)
    response = client.get(f"/api/pair?query={second}&item=0")
    assert response.status_code == 404 and "expired" in response.get_json()["error"]


def test_gallery_items_are_embedded_and_read_once_per_pair_view(served, monkeypatch):
    import webapp.item_files

    opened = webapp.item_files.open_image_file
    bytes_read = []

    class CountingReads(io.BufferedReader):
        def read(self, *args):
            data = super().read(*args)
            bytes_read.append(len(data))
            return data

    def counting_open(path, roots):
        return CountingReads(opened(path, roots).detach())

    monkeypatch.setattr(webapp.item_files, "open_image_file", counting_open)
    app = create_app([served["root"] / "index_data" / "colors"])
    client = app.test_client()
    result = search(client)["results"][0]
    client.get(result["pair_url"])
    client.get(result["heatmap_url"] + "&side=query")
    client.get(result["heatmap_url"])
    found = scrape(client)
    assert stage_count(found, "item_view") == 1 and stage_count(found, "heatmap") == 2
    image_file = served["paths"][result["id"]]
    assert sum(bytes_read) == image_file.stat().st_size  # the later requests find the view without reading


def test_pairs_work_outside_a_flask_request_on_the_settings_given(served):
    """webapp.pairs takes the served state as arguments: the same pair without an app, a request or its context,
    on settings built by hand, and nothing stored in any app's settings."""
    import flask

    from webapp.cache import LruCache
    from webapp.compute import ComputePool
    from webapp.errors import ApiError
    from webapp.metrics import Metrics
    from webapp.pairs import embedded_view, keep_query, kept_query, requested_pair
    from webapp.served import SearchSettings, load_indexes

    compute = ComputePool(1)
    settings = SearchSettings(
        indexes=load_indexes([served["root"] / "index_data" / "colors"], compute),
        default_k=3,
        max_k=10,
        max_pixels=1_000_000,
        max_upload_bytes=1 << 20,
        queries=LruCache(2, 60.0),
        item_views=LruCache(4, 60.0),
        metrics=Metrics(),
        compute=compute,
    )
    assert not flask.has_app_context()
    _, gallery = settings.gallery(None, unknown_status=404)
    view = embedded_view(png_bytes(), gallery, settings.max_pixels)
    query_id = keep_query(settings.queries, "colors", view)
    assert kept_query(settings.queries, query_id) == ("colors", view)
    pair = requested_pair(settings, {"query": query_id, "item": "1"})
    item = embedded_view(served["paths"][1].read_bytes(), gallery, settings.max_pixels)
    assert (pair.index, pair.item_id, pair.label) == ("colors", 1, gallery.items[1].label)
    assert pair.cosine == pytest.approx(float(view.embedding @ item.embedding), abs=1e-6)
    assert np.sum(pair.query_cells) == pytest.approx(pair.cosine, abs=1e-5)
    assert len(settings.item_views) == 1 and stage_count(exposed(settings.metrics), "item_view") == 1
    requested_pair(settings, {"query": query_id, "item": "1"})  # the item's view comes from these settings' cache
    assert stage_count(exposed(settings.metrics), "item_view") == 1
    with pytest.raises(ApiError, match="unknown or expired query id 'gone'.*the latest 2 searches"):
        kept_query(settings.queries, "gone")
    app_settings = served["app"].extensions["sct"]
    assert app_settings.queries.get(query_id) is None
