"""The web app on a tiny gallery: page, search (vs brute force), images, health, bad input, limits.

Also the helpers that the other webapp tests build their galleries and requests with."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import decode_rgb, load_rgb
from retrieval.embedder import OnnxEmbedder, file_sha256
from retrieval.gallery import GalleryItem, build_gallery
from webapp import create_app

MAX_UPLOAD = 100_000
MAX_K = 8


def build_gallery_of(directory: Path, model: Path, paths: list[Path], embedder: OnnxEmbedder) -> np.ndarray:
    embeddings = embedder.embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(id=i, path=str(p), label=p.parent.name) for i, p in enumerate(paths)]
    build_gallery(directory, embeddings, items, model, dataset="synthetic", split="test")
    return embeddings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("webapp")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=3)
    embedder = OnnxEmbedder(model)
    galleries = {
        "colors": build_gallery_of(root / "index_data" / "colors", model, paths, embedder),
        "reds": build_gallery_of(
            root / "index_data" / "reds", model, [p for p in paths if p.parent.name == "red"], embedder
        ),
    }
    app = create_app(
        [root / "index_data" / "colors", root / "index_data" / "reds"],
        max_upload_bytes=MAX_UPLOAD,
        default_k=4,
        max_k=MAX_K,
        max_pixels=250_000,
    )
    return {"app": app, "client": app.test_client(), "embedder": embedder, "galleries": galleries,
            "paths": paths, "model": model, "root": root}  # fmt: skip


def png_bytes(color=(200, 40, 40), size=(24, 18), seed=1) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def post_search(client, data: bytes | None = None, filename="q.png", **fields):
    form = {key: str(value) for key, value in fields.items()}
    if data is not None:
        form["image"] = (io.BytesIO(data), filename)
    return client.post("/api/search", data=form, content_type="multipart/form-data")


def _brute_force(served, name: str, data: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
    embedder = served["embedder"]
    query = embedder.embed_images([decode_rgb(data, min_side=embedder.preprocessing.decode_side)])[0]
    scores = served["galleries"][name] @ query
    ids = np.argsort(-scores, kind="stable")[:k]
    return ids, scores[ids]


def _assert_good_search(served, name="colors", k=3):
    data = png_bytes()
    response = post_search(served["client"], data, k=k, index=name)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    ids, scores = _brute_force(served, name, data, k)
    assert body["index"] == name
    assert [r["id"] for r in body["results"]] == ids.tolist()
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores, atol=1e-5)
    return body


def test_page_loads(served):
    client = served["client"]
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for needle in ('id="search-form"', 'id="drop-zone"', 'type="file"', 'id="k-input"', 'max="8"',
                   'value="4"', 'id="index-select"', '<option value="reds">', "/static/app.js", "/static/style.css",
                   'id="evaluation-link" href="/evaluation?index=colors"'):  # fmt: skip
        assert needle in html
    for asset in ("/static/app.js", "/static/style.css"):
        with client.get(asset) as response:
            assert response.status_code == 200


@pytest.mark.parametrize(("name", "k"), [("colors", 1), ("colors", 5), ("reds", 2)])
def test_search_matches_brute_force(served, name, k):
    body = _assert_good_search(served, name, k)
    gallery = served["app"].extensions["sct"].indexes[name].current()
    for result in body["results"]:
        assert result["label"] == gallery.items[result["id"]].label
        assert result["image_url"] == f"/api/items/{result['id']}/image?index={name}"
        assert result["heatmap_url"] == f"/api/heatmap?query={body['query_id']}&item={result['id']}&index={name}"
        assert result["pair_url"] == f"/pair?query={body['query_id']}&item={result['id']}&index={name}"
    assert set(body["timings_ms"]) == {"decode", "embed", "search", "render", "total"}
    timings = body["timings_ms"]
    assert all(value > 0 for value in timings.values())
    stages = timings["decode"] + timings["embed"] + timings["search"] + timings["render"]
    assert timings["total"] >= stages - 0.002  # the stages are disjoint parts of the request (each rounded to 1 µs)
    assert body["results"][0]["label"] == "red"


def test_search_defaults_and_k_above_gallery_size(served):
    body = post_search(served["client"], png_bytes()).get_json()
    assert body["index"] == "colors" and len(body["results"]) == 4  # default gallery, default_k
    body = post_search(served["client"], png_bytes(), k=MAX_K, index="reds").get_json()
    assert len(body["results"]) == 3  # the gallery has only 3 images


def test_item_image(served):
    client = served["client"]
    body = _assert_good_search(served, "colors", 2)
    with client.get(body["results"][0]["image_url"]) as response:
        assert response.status_code == 200 and response.mimetype == "image/png"
        assert response.data == Path(served["paths"][body["results"][0]["id"]]).read_bytes()
    with client.get("/api/items/4/image") as response:  # the default gallery when index is omitted
        assert response.data == served["paths"][4].read_bytes()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/api/items/9/image", "no item 9"),
        ("/api/items/3/image?index=reds", "no item 3"),
        ("/api/items/0/image?index=nope", "unknown index 'nope'"),
        ("/api/items/-1/image", "not found"),
        ("/api/items/..%2Fetc%2Fpasswd/image", "not found"),
    ],
)
def test_item_image_not_found(served, url, message):
    response = served["client"].get(url)
    assert response.status_code == 404
    assert message in response.get_json()["error"].lower()


def test_healthz(served):
    body = served["client"].get("/healthz").get_json()
    sha = file_sha256(served["model"])
    assert body == {
        "status": "ok",
        "indexes": [
            {"name": "colors", "count": 9, "model_sha256": sha, "dim": 8},
            {"name": "reds", "count": 3, "model_sha256": sha, "dim": 8},
        ],
    }


@pytest.mark.parametrize(
    ("data", "fields", "status", "message"),
    [
        (None, {}, 400, "missing file field 'image'"),
        (b"", {}, 400, "empty upload"),
        (b"GIF89a but not really", {}, 400, "not a recognised image"),
        (b"just some text, not an image", {}, 400, "not a recognised image"),
        (png_bytes(size=(64, 64))[:150], {}, 400, "truncated or corrupt"),
        (_png_header_only(50_000, 50_000), {}, 400, "decompression bomb"),
        (_png_header_only(1000, 1000), {}, 400, "too large: 1000×1000"),
        (png_bytes(), {"k": "abc"}, 400, "k must be an integer"),
        (png_bytes(), {"k": "2.5"}, 400, "k must be an integer"),
        (png_bytes(), {"k": "0"}, 400, "k must be between 1 and 8"),
        (png_bytes(), {"k": "9"}, 400, "k must be between 1 and 8"),
        (png_bytes(), {"index": "nope"}, 400, "unknown index 'nope'; served: colors, reds"),
    ],
)
def test_bad_input_is_a_4xx_json_error(served, data, fields, status, message):
    response = post_search(served["client"], data, **fields)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    _assert_good_search(served)  # the server keeps serving


def test_oversize_upload_is_413(served):
    response = post_search(served["client"], b"\0" * (MAX_UPLOAD + 1))
    assert response.status_code == 413
    assert "upload too large" in response.get_json()["error"]
    _assert_good_search(served)


def test_wrong_method_and_unknown_api_route_are_json(served):
    assert served["client"].get("/api/search").get_json()["error"]
    response = served["client"].get("/api/nothing")
    assert response.status_code == 404 and response.get_json()["error"]


def test_bad_gallery_fails_at_startup(served, tmp_path):
    with pytest.raises(FileNotFoundError):
        create_app([tmp_path / "missing"])
    with pytest.raises(ValueError, match="unique"):
        create_app([served["root"] / "index_data" / "colors", served["root"] / "index_data" / "colors"])


def test_serving_never_imports_torch(served):
    code = (
        "import io, sys; from webapp import create_app; import webapp.cli; from PIL import Image\n"
        f"app = create_app([{str(served['root'] / 'index_data' / 'colors')!r}])\n"
        "buffer = io.BytesIO(); Image.new('RGB', (9, 9), 'red').save(buffer, 'PNG')\n"
        "client = app.test_client()\n"
        "response = client.post('/api/search', data={'image': (io.BytesIO(buffer.getvalue()), 'q.png')})\n"
        "assert response.status_code == 200, response.data\n"
        "for url in (response.json['results'][0]['heatmap_url'], response.json['results'][0]['pair_url'],\n"
        "            '/evaluation', '/metrics'):\n"
        "    assert client.get(url).status_code == 200, url\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "sys.exit(f'torch modules imported: {loaded}' if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
