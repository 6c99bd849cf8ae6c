"""Gallery files are not a way to read the disk, and a swapped model is caught.

- ``sct index`` indexes only image files inside the data root (symlinks resolved) and records that root;
- the server sends an item only when the file it opened lies inside the recorded roots, typed by its decoded
  content, with headers that keep a browser from running anything it holds, whatever the file is named;
- a model.onnx swapped in a gallery folder, its sha256 edited into the manifest, is refused by its embedding
  of the probe image.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import webapp.item_files
from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.embedder import file_sha256
from retrieval.gallery import Gallery, GalleryItem, GalleryMismatchError, build_gallery
from sct.cli import main
from tests.test_webapp_api import png_bytes, post_search
from webapp import create_app

SECRET = b"TOP-SECRET-MARKER"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40)}


def sct(argv: list[str]) -> int:
    """The `sct` command line (sct.cli.main reports a UserError as `error: ...` and status 2)."""
    return main(argv)


def unit_vectors(count: int, dim: int = 8) -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def gif_html_polyglot() -> bytes:
    """A GIF that a browser sniffing for HTML would run: a script after the image's trailer."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 128, 255)).save(buffer, "GIF")
    return buffer.getvalue() + b"<html><body><script>alert(document.cookie)</script></body></html>"


def secret_png(path: Path) -> Path:
    """A real image, to be put outside the image root, with a marker in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", SECRET.decode())
    Image.new("RGB", (20, 20), (200, 40, 40)).save(path, "PNG", pnginfo=info)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx")


# --- sct index: only image files inside the data root, and the root recorded ---------------------------------


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A folder dataset (split.csv is written by each test), and an image beside it."""
    root = tmp_path / "data"
    make_color_images(root, classes=COLORS, per_class=2)
    secret_png(tmp_path / "outside.png")
    return root


def write_split(root: Path, extra_rows: list[str]) -> None:
    rows = [f"{color}/{i}.png,{color},test" for color in COLORS for i in range(2)]
    (root / "split.csv").write_text("path,label,split\n" + "\n".join(rows + extra_rows) + "\n")


def index_dataset(model: Path, root: Path | str, out: Path, *extra: str) -> int:
    return sct(
        ["index", "--model", str(model), "--dataset", "folder", "--data-root", str(root), "--out", str(out), *extra]
    )


@pytest.mark.parametrize(
    ("listed", "reason"),
    [
        ("x.html", "extension '.html' is not an image extension"),
        ("../outside.png", "outside"),
        ("escape.png", "outside"),  # a symlink to ../outside.png
    ],
)
def test_sct_index_refuses_files_that_are_not_images_inside_the_data_root(
    model, dataset, tmp_path, capsys, listed, reason
):
    (dataset / "x.html").write_bytes(gif_html_polyglot())  # decodes as a GIF: only its name gives it away
    (dataset / "escape.png").symlink_to(tmp_path / "outside.png")
    write_split(dataset, [f"{listed},blue,test"])
    out = tmp_path / "gallery"
    assert index_dataset(model, dataset, out) == 2
    err = capsys.readouterr().err
    assert "\nerror: refusing to index 1 of 5 listed file(s)" in err and listed in err and reason in err
    assert not out.exists()


def test_sct_index_names_a_few_refused_files_and_counts_them_all(model, dataset, tmp_path, capsys):
    write_split(dataset, ["../outside.png,blue,test"] * 7 + ["notes.txt,blue,test"])
    (dataset / "notes.txt").write_text("not an image")
    assert index_dataset(model, dataset, tmp_path / "gallery") == 2
    err = capsys.readouterr().err
    assert "refusing to index 8 of 12 listed file(s)" in err
    assert err.count("(resolves to") == 5 and "notes.txt" not in err and err.rstrip().endswith("; ...")


def test_sct_index_of_an_image_folder_refuses_a_symlink_leaving_it(model, tmp_path, capsys):
    images = tmp_path / "photos"
    make_color_images(images, classes=COLORS, per_class=2)
    (images / "red" / "escape.png").symlink_to(secret_png(tmp_path / "secret.png"))
    assert sct(["index", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    images, secret = images.resolve(), (tmp_path / "secret.png").resolve()
    assert f"{images / 'red' / 'escape.png'} (resolves to {secret}, outside {images})" in err


def test_the_resolved_data_root_is_recorded_and_carried_through_shards(model, dataset, tmp_path):
    write_split(dataset, [])
    alias = tmp_path / "alias"
    alias.symlink_to(dataset)  # the root is recorded resolved
    assert index_dataset(model, alias, tmp_path / "whole") == 0
    assert Gallery.load(tmp_path / "whole").manifest["image_roots"] == [str(dataset.resolve())]
    for shard in ("0/2", "1/2"):
        assert index_dataset(model, alias, tmp_path / "shards", "--shard", shard) == 0
    assert sct(["index", "--merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    assert Gallery.load(tmp_path / "merged").manifest["image_roots"] == [str(dataset.resolve())]


# --- the server: files inside the image roots only, typed by content ------------------------------------------


@pytest.fixture
def indexed(model, tmp_path):
    """A gallery indexed by `sct index --images` whose folder holds a symlink to one of its own images."""
    images = tmp_path / "images"
    make_color_images(images, classes=COLORS, per_class=2)
    (images / "green" / "link.png").symlink_to(images / "red" / "0.png")
    assert sct(["index", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "g")]) == 0
    app = create_app([tmp_path / "g"])
    link_id = next(item.id for item in Gallery.load(tmp_path / "g").items if item.path.endswith("link.png"))
    return {
        "client": app.test_client(),
        "images": images,
        "link": images / "green" / "link.png",
        "id": link_id,
        "secret": secret_png(tmp_path / "secret.png"),
    }


@pytest.mark.parametrize("target", ["secret", "/etc/passwd"])
def test_a_symlink_swapped_after_indexing_is_not_followed_out_of_the_root(indexed, target):
    client, item = indexed["client"], indexed["id"]
    query = post_search(client, png_bytes()).get_json()["query_id"]
    with client.get(f"/api/items/{item}/image") as response:
        assert response.status_code == 200 and response.data == (indexed["images"] / "red" / "0.png").read_bytes()
    assert client.get(f"/api/heatmap?query={query}&item={item}").status_code == 200
    indexed["link"].unlink()
    indexed["link"].symlink_to(indexed["secret"] if target == "secret" else target)
    for url in (f"/api/items/{item}/image", f"/api/heatmap?query={query}&item={item}"):
        response = client.get(url)
        message = response.get_json()["error"]
        assert response.status_code == 404 and "not a file inside the gallery's image folders" in message
        assert SECRET not in response.data and b"root:" not in response.data
        assert "secret" not in message and "passwd" not in message  # the target is not revealed


def test_a_symlink_swapped_between_check_and_open_is_caught(indexed, monkeypatch):
    """The path checked is the one the open descriptor links to, not one resolved before opening."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux)")
    real_open = os.open

    def swap_then_open(path, flags, *args):
        indexed["link"].unlink()
        indexed["link"].symlink_to(indexed["secret"])
        return real_open(path, flags, *args)

    monkeypatch.setattr(webapp.item_files.os, "open", swap_then_open)
    with pytest.raises(webapp.item_files.OutsideImageRoots):
        webapp.item_files.open_image_file(str(indexed["link"]), [str(indexed["images"])])


def build_served(model: Path, tmp_path: Path, files: dict[str, bytes], *, edit: dict[int, str] | None = None):
    """A served gallery of ``files`` (name → bytes) in tmp_path/images, its items.csv edited as ``edit`` says
    (id → path) before the server starts."""
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for name, data in files.items():
        (images / name).write_bytes(data)
        paths.append(images / name)
    items = [GalleryItem(i, str(path), "x") for i, path in enumerate(paths)]
    folder = build_gallery(
        tmp_path / "g", unit_vectors(len(items)), items, model, dataset="d", split="s", image_roots=[images]
    )
    if edit:
        lines = (folder / "items.csv").read_text().splitlines(keepends=True)
        for item, path in edit.items():
            lines[item + 1] = f"{item},{path},x\n"
        (folder / "items.csv").write_text("".join(lines))
    return create_app([folder]).test_client(), folder


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/etc/passwd", "is not a file inside the gallery's image folders"),
        ("model.onnx", "is not a file inside the gallery's image folders"),
        ("secret", "is not a file inside the gallery's image folders"),
        ("NUL", "cannot be read (its path holds a NUL character)"),
    ],
)
def test_items_csv_edited_to_point_elsewhere_is_not_served(model, tmp_path, target, message):
    path = {
        "model.onnx": str(tmp_path / "g" / "model.onnx"),
        "/etc/passwd": "/etc/passwd",
        "secret": str(secret_png(tmp_path / "secret.png")),
        "NUL": str(tmp_path / "images" / "a\0.png"),
    }[target]
    client, _ = build_served(model, tmp_path, {"a.png": png_bytes(), "b.png": png_bytes(seed=2)}, edit={1: path})
    assert client.get("/api/items/0/image").status_code == 200
    response = client.get("/api/items/1/image")
    assert response.status_code == 404 and message in response.get_json()["error"]
    assert path not in response.get_json()["error"]
    assert SECRET not in response.data and b"root:" not in response.data and b"onnx" not in response.data.lower()


def test_an_html_polyglot_is_served_as_the_gif_it_is_and_cannot_run(model, tmp_path):
    client, _ = build_served(model, tmp_path, {"x.html": gif_html_polyglot()})
    response = client.get("/api/items/0/image")
    assert response.status_code == 200 and response.mimetype == "image/gif"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert response.headers["Content-Disposition"] == "inline; filename=\"x.gif\"; filename*=UTF-8''x.gif"
    assert response.headers["Cache-Control"] == "private, max-age=300"


@pytest.mark.parametrize("name", ['say "hi"\r\nX-Injected: yes.png', "new\nline.png", 'quote";x=.png', "été 東京.png"])
def test_any_file_name_gives_a_safe_content_disposition(model, tmp_path, name):
    client, _ = build_served(model, tmp_path, {name: png_bytes()})
    response = client.get("/api/items/0/image")
    assert response.status_code == 200 and response.mimetype == "image/png" and "X-Injected" not in response.headers
    disposition = response.headers["Content-Disposition"]
    assert not any(ch in disposition for ch in "\r\n") and disposition.isascii()
    plain, encoded = disposition.split("; filename*=UTF-8''")
    assert plain.startswith('inline; filename="') and plain.endswith('.png"') and plain.count('"') == 2
    assert ";" not in encoded and unquote(encoded) == name


def test_an_image_browsers_may_not_show_is_served_as_png(model, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF")
    client, _ = build_served(model, tmp_path, {"scan.tif": buffer.getvalue()})
    response = client.get("/api/items/0/image")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert 'filename="scan.png"' in response.headers["Content-Disposition"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.data))), pixels)


def test_a_file_that_is_not_an_image_is_not_served(model, tmp_path):
    client, _ = build_served(model, tmp_path, {"notes.png": SECRET + b" <script>alert(1)</script>"})
    response = client.get("/api/items/0/image")
    assert response.status_code == 404 and "cannot be read" in response.get_json()["error"]
    assert SECRET not in response.data


# --- the model: recognised by its embedding of the probe image ------------------------------------------------


@pytest.fixture
def gallery_folder(model, tmp_path) -> Path:
    items = [GalleryItem(i, f"{i}.jpg", "x") for i in range(6)]
    return build_gallery(tmp_path / "g", unit_vectors(6), items, model, dataset="d", split="s")


def rewrite_manifest(folder: Path, **changes) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return manifest


def test_a_swapped_model_with_its_sha256_edited_in_is_refused(gallery_folder):
    Gallery.load(gallery_folder)  # untouched, it loads
    make_tiny_model(gallery_folder / "model.onnx", seed=1)  # same input, outputs and metadata; other weights
    rewrite_manifest(gallery_folder, model_sha256=file_sha256(gallery_folder / "model.onnx"))
    with pytest.raises(GalleryMismatchError, match=r"model.onnx is not the model.*probe_embedding is -?0\.\d{4}"):
        Gallery.load(gallery_folder)


def test_a_format_1_gallery_is_refused_with_how_to_rebuild_it(gallery_folder):
    rewrite_manifest(gallery_folder, format_version=1, image_roots=None, probe_embedding=None)
    with pytest.raises(
        GalleryMismatchError,
        match=r"format_version is 1; this version reads 2, 3: rebuild the gallery with `sct index`",
    ):
        Gallery.load(gallery_folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_roots": []}, "image_roots must be a non-empty list of absolute folders, got []"),
        ({"image_roots": ["images"]}, "image_roots must be a non-empty list of absolute folders, got ['images']"),
        ({"image_roots": "/data"}, "image_roots must be a non-empty list"),
        ({"probe_embedding": "0.1, 0.2"}, "probe_embedding must be a list of numbers"),
        ({"probe_embedding": [0.5, True]}, "probe_embedding must be a list of numbers"),
        ({"probe_embedding": [0.5, 0.5]}, "embedding dimension mismatch: manifest.json embedding_dim = 8, "),
    ],
)
def test_a_manifest_with_bad_image_roots_or_probe_is_refused(gallery_folder, changes, message):
    rewrite_manifest(gallery_folder, **changes)
    with pytest.raises(GalleryMismatchError) as error:
        Gallery.load(gallery_folder)
    assert message in str(error.value)
