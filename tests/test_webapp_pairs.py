"""Pairs: a search keeps its query; the pair JSON, the heatmap PNGs and the pair page; their 4xx errors."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import decode_rgb, load_rgb
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
    app = create_app([root / "index_data" / name for name in ("colors", "other", "lost")], query_store=root / "store")
    return {"app": app, "client": app.test_client(), "root": root, "paths": paths, "model": model}


def search(client, index: str = "colors", k: int = 3, data: bytes | None = None) -> dict:
    response = post_search(client, png_bytes() if data is None else data, k=k, index=index)
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
    ("query=nope&item=0", 404, "unknown or expired query id 'nope': the query_id of a search response is 64 hex"),
    (
        f"query={'0' * 64}&item=0",
        404,
        f"unknown or expired query id '{'0' * 64}': this server's query store keeps the image",
    ),
    ("query={qid}", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=abc", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=-1", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=99", 404, "no item 99 in gallery 'colors'"),
    ("query={qid}&item=99999999999999999999", 400, "parameter 'item' must be a gallery item id"),
    ("query={qid}&item=0&index=nope", 404, "unknown index 'nope'"),
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


def query_views(client) -> int:
    """How many times the app embedded a query again for a pair (its views are not in the worker's LRU)."""
    return stage_count(scrape(client), "query_view")  # 0 until the stage is first timed


def test_the_query_id_is_the_sha256_of_the_upload_and_names_its_stored_bytes(served):
    data = png_bytes(seed=11)
    body = search(served["client"], data=data)
    assert body["query_id"] == hashlib.sha256(data).hexdigest()
    assert (served["root"] / "store" / body["query_id"]).read_bytes() == data
    assert search(served["client"], data=data)["query_id"] == body["query_id"]  # the same image, the same id


def test_queries_dropped_by_the_workers_lru_are_embedded_again_from_the_query_store(served, tmp_path):
    app = create_app([served["root"] / "index_data" / "colors"], kept_queries=2, query_ttl_s=0.5, query_store=tmp_path)
    client = app.test_client()
    first, second, third = (search(client, data=png_bytes(seed=seed)) for seed in (1, 2, 3))
    assert {first["query_id"], second["query_id"], third["query_id"]} == {p.name for p in tmp_path.iterdir()}

    def cosine(body: dict) -> float:
        response = client.get(f"/api/pair?query={body['query_id']}&item={body['results'][0]['id']}")
        assert response.status_code == 200, response.get_json()
        return response.get_json()["cosine"]

    assert cosine(third) == pytest.approx(third["results"][0]["score"], abs=1e-5) and query_views(client) == 0
    assert cosine(first) == pytest.approx(first["results"][0]["score"], abs=1e-5)  # out of the LRU of 2
    assert query_views(client) == 1
    cosine(first)  # back in the LRU
    assert query_views(client) == 1
    time.sleep(0.6)  # every view in the LRU expired
    assert cosine(second) == pytest.approx(second["results"][0]["score"], abs=1e-5) and query_views(client) == 2
    (tmp_path / first["query_id"]).unlink()  # gone from the store too
    response = client.get(f"/api/pair?query={first['query_id']}&item=0")
    assert response.status_code == 404
    assert (
        "unknown or expired query id" in response.get_json()["error"] and "search again" in response.get_json()["error"]
    )


def test_a_query_pairs_with_the_items_of_a_gallery_of_another_model(served):
    """The stored image is embedded with the model of the gallery asked for: a pair in another gallery than the
    search's, or in a gallery rebuilt with another model, is that model's cosine (no 'search again')."""
    data = png_bytes(seed=5)
    query_id = search(served["client"], data=data)["query_id"]
    response = served["client"].get(f"/api/pair?query={query_id}&item=4&index=other")
    assert response.status_code == 200, response.get_json()
    pair = response.get_json()
    other = OnnxEmbedder(served["root"] / "other.onnx")
    side = other.preprocessing.decode_side
    query, item = other.embed_images([decode_rgb(data, min_side=side), load_rgb(served["paths"][4])])
    assert pair["index"] == "other" and pair["cosine"] == pytest.approx(float(query @ item), abs=1e-5)
    colors = served["client"].get(f"/api/pair?query={query_id}&item=4&index=colors").get_json()
    assert abs(colors["cosine"] - pair["cosine"]) > 1e-3  # two models, two answers


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


def test_pairs_work_outside_a_flask_request_on_the_settings_given(served, tmp_path):
    """webapp.pairs takes the served state as arguments: the same pair without an app, a request or its context,
    on settings built by hand, and nothing stored in any app's settings."""
    import flask

    from webapp.cache import LruCache
    from webapp.compute import ComputePool
    from webapp.errors import ApiError
    from webapp.metrics import Metrics
    from webapp.pairs import embedded_view, keep_query, kept_query, requested_pair
    from webapp.query_store import QueryStore
    from webapp.served import SearchSettings, load_indexes

    compute = ComputePool(1)
    settings = SearchSettings(
        indexes=load_indexes([served["root"] / "index_data" / "colors"], compute),
        default_k=3,
        max_k=10,
        max_pixels=1_000_000,
        max_upload_bytes=1 << 20,
        queries=LruCache(2, 60.0),
        query_store=QueryStore(tmp_path, max_bytes=1 << 20, max_age_s=3600),
        item_views=LruCache(4, 60.0),
        metrics=Metrics(),
        compute=compute,
    )
    assert not flask.has_app_context()
    _, gallery = settings.gallery(None, unknown_status=404)
    data = png_bytes(seed=21)
    view = embedded_view(data, gallery, settings.max_pixels)
    query_id = keep_query(settings, data, view)
    assert kept_query(settings, query_id, gallery) is view
    pair = requested_pair(settings, {"query": query_id, "item": "1"})
    item = embedded_view(served["paths"][1].read_bytes(), gallery, settings.max_pixels)
    assert (pair.index, pair.item_id, pair.label) == ("colors", 1, gallery.items[1].label)
    assert pair.cosine == pytest.approx(float(view.embedding @ item.embedding), abs=1e-6)
    assert np.sum(pair.query_cells) == pytest.approx(pair.cosine, abs=1e-5)
    assert len(settings.item_views) == 1 and stage_count(exposed(settings.metrics), "item_view") == 1
    requested_pair(settings, {"query": query_id, "item": "1"})  # the item's view comes from these settings' cache
    assert stage_count(exposed(settings.metrics), "item_view") == 1
    with pytest.raises(ApiError, match="unknown or expired query id '0+'.*search for 1 h, up to 1 MiB.*search again"):
        kept_query(settings, "0" * 64, gallery)
    app_settings = served["app"].extensions["sct"]
    assert app_settings.queries.get((view.model_sha256, query_id)) is None
    assert not (served["root"] / "store" / query_id).exists()


# --- any server sharing the query store; a posted query -------------------------------------------------------


def test_another_server_sharing_the_query_store_answers_the_pairs_of_a_search(served, tmp_path):
    folders = [served["root"] / "index_data" / name for name in ("colors", "other")]
    first, second = (create_app(folders, query_store=tmp_path).test_client() for _ in range(2))
    data = png_bytes(seed=31)
    body = search(first, data=data)
    embedder = OnnxEmbedder(served["model"])  # the cosine computed here, apart from the server
    query = embedder.embed_images([decode_rgb(data, min_side=embedder.preprocessing.decode_side)])[0]
    for result in body["results"]:
        url = f"/api/pair?query={body['query_id']}&item={result['id']}&index=colors"
        there, here = first.get(url), second.get(url)
        assert here.status_code == 200, here.get_json()
        assert here.get_json() == there.get_json()
        pair = here.get_json()
        item = embedder.embed_images([load_rgb(served["paths"][result["id"]])])[0]
        assert pair["cosine"] == pytest.approx(float(query @ item), abs=1e-5)
        for cells in (pair["query_cells"], pair["item_cells"]):
            assert np.sum(cells) == pytest.approx(float(query @ item), abs=1e-5)
        for side in ("query", "item"):
            heatmaps = [client.get(f"{result['heatmap_url']}&side={side}") for client in (first, second)]
            assert heatmaps[1].status_code == 200 and heatmaps[1].mimetype == "image/png"
            assert heatmaps[1].data == heatmaps[0].data
        page = second.get(result["pair_url"])
        assert page.status_code == 200 and f'id="pair-cosine">{pair["cosine"]:.3f}<' in page.get_data(as_text=True)
    assert query_views(first) == 0 and query_views(second) == 1  # embedded once from the store, then its LRU
    elsewhere = create_app(folders, query_store=tmp_path / "elsewhere").test_client()
    response = elsewhere.get(body["results"][0]["heatmap_url"])
    assert response.status_code == 404 and "search again" in response.get_json()["error"]


def post_pair(client, endpoint: str, data: bytes | list[bytes] | None, **fields):
    form: dict = {key: str(value) for key, value in fields.items()}
    if data is not None:
        form["image"] = [(io.BytesIO(part), "q.png") for part in (data if isinstance(data, list) else [data])]
    return client.post(endpoint, data=form, content_type="multipart/form-data")


URLS = ("query_heatmap_url", "item_heatmap_url", "pair_url")


def test_a_posted_image_pairs_as_its_search_does_and_is_kept_nowhere(served, tmp_path):
    client = create_app([served["root"] / "index_data" / "colors"], query_store=tmp_path).test_client()
    data = png_bytes(seed=41)
    posted = post_pair(client, "/api/pair", data, item=2, index="colors")
    assert posted.status_code == 200, posted.get_json()
    assert list(tmp_path.iterdir()) == []
    query_id = hashlib.sha256(data).hexdigest()
    assert client.get(f"/api/pair?query={query_id}&item=2").status_code == 404  # nor kept by the worker
    assert search(client, data=data)["query_id"] == query_id
    got = client.get(f"/api/pair?query={query_id}&item=2&index=colors").get_json()
    posted = posted.get_json()
    assert {key: value for key, value in posted.items() if key not in URLS} == {
        key: value for key, value in got.items() if key not in URLS
    }
    assert posted["query_id"] == query_id and all(posted[url] is None for url in URLS) and got["pair_url"]
    for side in ("query", "item"):
        drawn = post_pair(client, "/api/heatmap", data, item=2, side=side)
        assert drawn.status_code == 200 and drawn.mimetype == "image/png"
        assert drawn.data == client.get(f"{got['item_heatmap_url'][: -len('&side=item')]}&side={side}").data


@pytest.mark.parametrize("endpoint", ["/api/pair", "/api/heatmap"])
@pytest.mark.parametrize(
    ("image", "fields", "status", "message"),
    [
        (None, {"item": 0}, 400, "missing file field 'image'"),
        ([png_bytes(), png_bytes()], {"item": 0}, 400, "one image per request: the file field 'image' holds 2"),
        (png_bytes()[:60], {"item": 0}, 400, "cannot read the uploaded image"),
        (png_bytes(), {}, 400, "parameter 'item' must be a gallery item id"),
        (png_bytes(), {"item": 0, "query": "0" * 64}, 400, "give one query"),
        (png_bytes(), {"item": 0, "query_item": 1}, 400, "give one query"),
        (png_bytes(), {"item": 99}, 404, "no item 99 in gallery 'colors'"),
        (png_bytes(), {"item": 0, "index": "nope"}, 404, "unknown index 'nope'"),
    ],
)
def test_bad_posted_pairs_are_4xx_json(served, endpoint, image, fields, status, message):
    response = post_pair(served["client"], endpoint, image, **fields)
    assert response.status_code == status and message in response.get_json()["error"]


@pytest.mark.parametrize("endpoint", ["/api/pair", "/api/heatmap"])
def test_a_posted_image_has_the_upload_limit_and_errors_of_a_search(served, endpoint, tmp_path):
    limit = len(png_bytes())
    client = create_app(
        [served["root"] / "index_data" / "colors"], max_upload_bytes=limit, query_store=tmp_path
    ).test_client()
    assert post_pair(client, endpoint, png_bytes(), item=0).status_code == 200  # exactly the limit
    for data, status in ((png_bytes() + b"x", 413), (png_bytes()[:60], 400), (b"x" * (1 << 20), 413)):
        searched = post_search(client, data)
        paired = post_pair(client, endpoint, data, item=0)
        assert paired.status_code == searched.status_code == status
        assert paired.get_json() == searched.get_json()
