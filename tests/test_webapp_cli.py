"""``sct serve`` argument handling and the documented gunicorn factory call."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from sct.cli import main
from webapp import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sct")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_defaults_and_repeated_index():
    args = _parser().parse_args(["serve", "--index", "a", "--index", "b"])
    assert (args.index, args.host, args.port, args.max_upload_mb) == (["a", "b"], "127.0.0.1", 5000, 16)
    assert args.func is cli.serve


def test_help_shows_a_gunicorn_command_that_gunicorn_accepts(capsys):
    """The documented command line parses with gunicorn's own parser into the settings `sct serve` uses."""
    import shlex

    from gunicorn.config import Config

    from webapp import server

    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Examples:" in out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("gunicorn "))
    config = Config()
    parsed = config.parser().parse_args(shlex.split(command)[1:])
    for key, value in vars(parsed).items():
        if value is not None and key in config.settings:
            config.set(key, value)
    assert config.worker_class is server.SlowClientSafeWorker
    assert config.keepalive == server.HEADER_TIMEOUT_S and config.control_socket_disable
    assert parsed.args == ['webapp:create_app(["index_data/NAME"])']


def test_missing_index_is_error_2(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
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
    assert main(["serve", "--index", str(gallery)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert np.isfinite(embeddings).all()


def test_gunicorn_loads_the_documented_factory_call(tmp_path, monkeypatch):
    util = pytest.importorskip("gunicorn.util")
    from catalog import load_rgb
    from retrieval.embedder import OnnxEmbedder
    from retrieval.gallery import GalleryItem, build_gallery

    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=1)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(i, str(p), p.parent.name) for i, p in enumerate(paths)]
    build_gallery(tmp_path / "index_data" / "NAME", embeddings, items, model, dataset="synthetic", split="test")
    monkeypatch.chdir(tmp_path)
    app = util.import_app('webapp:create_app(["index_data/NAME"])')
    assert app.test_client().get("/healthz").get_json()["indexes"][0]["name"] == "NAME"


@pytest.mark.parametrize("flag", ["--workers", "--threads", "--max-upload-mb"])
def test_non_positive_server_settings_are_error_2(flag, capsys):
    assert main(["serve", "--index", "x", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_gunicorn_server_builds_the_app_from_the_factory():
    from flask import Flask

    from webapp.server import GunicornServer

    built = []
    server = GunicornServer(
        lambda: built.append(Flask("x")) or built[-1],
        {"bind": "127.0.0.1:0", "workers": 3, "threads": 2, "worker_class": "gthread"},
    )
    assert (server.cfg.workers, server.cfg.threads, server.cfg.bind) == (3, 2, ["127.0.0.1:0"])
    assert not built  # nothing is built before a worker asks for it
    assert server.load() is built[0]


def test_batch_limits_reach_the_app_and_are_checked(monkeypatch, capsys):
    from core.errors import UserError

    given = []

    def fake_create_app(index_dirs, **settings):
        given.append(settings)
        raise UserError("stop here")

    monkeypatch.setattr(cli, "create_app", fake_create_app)
    assert main(["serve", "--index", "x", "--max-batch", "5", "--max-batch-mb", "40"]) == 2
    assert (given[0]["max_batch"], given[0]["max_batch_bytes"]) == (5, 40 << 20)
    assert main(["serve", "--index", "x"]) == 2
    assert (given[1]["max_batch"], given[1]["max_batch_bytes"]) == (16, None)  # create_app's default total
    capsys.readouterr()
    assert main(["serve", "--index", "x", "--max-batch-mb", "8"]) == 2
    assert "--max-batch-mb (8) must be at least --max-upload-mb (16)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--index", "x", "--max-batch", "0"])
    assert "--max-batch" in capsys.readouterr().err
    assert len(given) == 2
