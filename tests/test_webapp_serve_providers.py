"""`sct serve` checks its galleries in gunicorn's master on the CPU only (a CUDA session made before the fork would
be inherited by the workers); the workers, and the development server, load them with the default providers."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

import webapp.live
from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.gallery import Gallery
from sct.cli import main


def _gallery(tmp_path: Path) -> Path:
    from catalog import load_rgb
    from retrieval.embedder import OnnxEmbedder
    from retrieval.gallery import GalleryItem, build_gallery

    model = make_tiny_model(tmp_path / "model.onnx")
    paths = make_color_images(tmp_path / "images", per_class=1)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(p) for p in paths])
    items = [GalleryItem(i, str(p), p.parent.name) for i, p in enumerate(paths)]
    return build_gallery(tmp_path / "g", embeddings, items, model, dataset="synthetic", split="test")


@pytest.fixture
def loads(monkeypatch) -> list:
    """The providers of each Gallery.load that serving does, and the providers its embedder session runs on."""
    seen: list = []

    class SpyGallery:
        @staticmethod
        def load(directory, providers=None):
            gallery = Gallery.load(directory, providers=providers)
            seen.append((providers, gallery.embedder.session.get_providers()))
            return gallery

    monkeypatch.setattr(webapp.live, "Gallery", SpyGallery)
    return seen


def test_the_gunicorn_master_checks_on_the_cpu_and_workers_load_with_the_default_providers(
    tmp_path, monkeypatch, loads
) -> None:
    server = pytest.importorskip("webapp.server")
    gallery = _gallery(tmp_path)
    workers: list[Flask] = []
    monkeypatch.setattr(server, "serve_with_gunicorn", lambda factory, **kwargs: workers.append(factory()))
    assert main(["serve", "--index", str(gallery)]) == 0
    assert len(workers) == 1
    assert loads[0] == (("CPUExecutionProvider",), ["CPUExecutionProvider"])  # the master's check
    assert loads[1][0] is None  # a worker: Gallery.load's default (CUDA where ONNX Runtime has it)


def test_the_development_server_serves_what_it_loaded_with_the_default_providers(tmp_path, monkeypatch, loads) -> None:
    gallery = _gallery(tmp_path)
    monkeypatch.setattr(Flask, "run", lambda app, **kwargs: None)
    assert main(["serve", "--index", str(gallery), "--dev-server"]) == 0
    assert [providers for providers, _ in loads] == [None]


def test_a_reloaded_gallery_keeps_its_providers(tmp_path, loads) -> None:
    gallery = _gallery(tmp_path)
    live = webapp.live.LiveGallery(gallery, providers=("CPUExecutionProvider",))
    (gallery / "items.csv").touch()  # a new stamp: the next request reloads the folder
    (gallery / "items.csv").write_text((gallery / "items.csv").read_text())
    live.current()
    assert [providers for providers, _ in loads] == [("CPUExecutionProvider",)] * 2
