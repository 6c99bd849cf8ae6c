"""``sct serve`` argument handling and the documented gunicorn factory call."""

from __future__ import annotations

import argparse

import pytest

from tests.onnx_fixture import make_color_images, make_tiny_model
from webapp import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sct")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_defaults_and_repeated_index():
    args = _parser().parse_args(["serve", "--index", "a", "--index", "b"])
    assert (args.index, args.host, args.port, args.max_upload_mb) == (["a", "b"], "127.0.0.1", 5000, 16)
    assert args.func is cli.serve


def test_help_shows_examples_with_gunicorn(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Examples:" in out and "gunicorn -w 2 -b 127.0.0.1:5000 'webapp:create_app([\"index_data/NAME\"])'" in out


def test_missing_index_is_error_2(tmp_path, capsys):
    args = _parser().parse_args(["serve", "--index", str(tmp_path / "missing")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err


def test_mismatched_index_is_error_2(tmp_path, capsys):
    import numpy as np

    from catalog import load_rgb
    from retrieval.embedder import OnnxEmbedder
    from retrieval.gallery import GalleryItem, build_gallery

    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=1)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(i, str(p), p.parent.name) for i, p in enumerate(paths)]
    gallery = build_gallery(tmp_path / "g", embeddings, items, model, dataset="synthetic", split="test")
    make_tiny_model(gallery / "model.onnx", seed=1)  # a different model than the one indexed
    args = _parser().parse_args(["serve", "--index", str(gallery)])
    assert args.func(args) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert np.isfinite(embeddings).all()


def test_gunicorn_loads_the_documented_factory_call(tmp_path, monkeypatch):
    util = pytest.importorskip("gunicorn.util")
    from retrieval.gallery import GalleryItem, build_gallery
    from retrieval.embedder import OnnxEmbedder
    from catalog import load_rgb

    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=1)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(i, str(p), p.parent.name) for i, p in enumerate(paths)]
    build_gallery(tmp_path / "index_data" / "NAME", embeddings, items, model, dataset="synthetic", split="test")
    monkeypatch.chdir(tmp_path)
    app = util.import_app('webapp:create_app(["index_data/NAME"])')
    assert app.test_client().get("/healthz").get_json()["indexes"][0]["name"] == "NAME"
