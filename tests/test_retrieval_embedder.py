"""The ONNX embedder on the tiny fixture model, checked against a numpy re-computation of that model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from benchmarks.fixtures.tiny_onnx import GRID, MEAN, STD, make_color_images, make_tiny_model, tiny_model_weights
from catalog import load_rgb
from retrieval.embedder import OnnxEmbedder, file_sha256
from retrieval.preprocessing import Preprocessing, preprocess


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx", image_size=16, dim=8, seed=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_color_images(tmp_path_factory.mktemp("images"), per_class=3)


def numpy_model(inputs: np.ndarray, dim: int = 8, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The fixture model's arithmetic, written out: cell means → affine map → mean → L2 normalise."""
    weight, bias = tiny_model_weights(dim=dim, seed=seed)
    n, channels, size, _ = inputs.shape
    cell = size // GRID
    cells = inputs.reshape(n, channels, GRID, cell, GRID, cell).mean(axis=(3, 5))  # [N, 3, g, g]
    feature_map = cells.reshape(n, channels, GRID * GRID).transpose(0, 2, 1) @ weight + bias
    pooled = feature_map.mean(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True), feature_map


def test_reads_contract_metadata(model):
    embedder = OnnxEmbedder(model)
    assert embedder.dim == 8
    assert embedder.preprocessing == Preprocessing(16, 20, MEAN, STD)
    assert embedder.sha256 == file_sha256(model)


def test_embeddings_and_maps_match_the_model_arithmetic(model, images):
    embedder = OnnxEmbedder(model)
    pictures = [load_rgb(path) for path in images]
    inputs = np.stack([preprocess(picture, embedder.preprocessing) for picture in pictures])
    expected_embeddings, expected_maps = numpy_model(inputs)
    embeddings, maps = embedder.embed_with_maps(pictures)
    assert maps.shape == (len(images), GRID * GRID, 8)
    assert np.allclose(embeddings, expected_embeddings, atol=1e-5) and np.allclose(maps, expected_maps, atol=1e-5)
    assert np.allclose(embedder.embed_images(pictures), embeddings, atol=1e-6)
    # The heatmap identity of the model contract: cells of a's map against b's embedding sum to cos(a, b).
    a, b = 0, 4
    cells = maps[a] @ embeddings[b] / (maps.shape[1] * np.linalg.norm(maps[a].mean(axis=0)))
    assert cells.sum() == pytest.approx(float(embeddings[a] @ embeddings[b]), abs=1e-5)
    labels = [path.parent.name for path in images]
    nearest = np.argsort(-(embeddings @ embeddings.T), axis=1)[:, 1]
    assert all(labels[i] == labels[j] for i, j in enumerate(nearest))  # colours separate
    assert embedder.embed_images([]).shape == (0, 8)


def test_embed_paths_skips_unreadable_files_across_batches(model, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [images[0], broken, images[1], images[2], tmp_path / "missing.png", images[3], empty]
    embedder = OnnxEmbedder(model)
    result = embedder.embed_paths(paths, batch_size=2, progress=False)
    assert result.kept_indices.tolist() == [0, 2, 3, 5]
    assert [path for path, _ in result.failures] == [str(broken), str(tmp_path / "missing.png"), str(empty)]
    assert all(reason for _, reason in result.failures)
    expected = embedder.embed_images([load_rgb(paths[i]) for i in result.kept_indices])
    assert np.allclose(result.embeddings, expected, atol=1e-6)
    nothing = embedder.embed_paths([broken], progress=False)
    assert nothing.embeddings.shape == (0, 8) and len(nothing.failures) == 1


def test_bad_models_are_reported_clearly(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        OnnxEmbedder(tmp_path / "none.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load ONNX model"):
        OnnxEmbedder(garbage)
    proto = onnx.load(model)
    kept = [prop for prop in proto.metadata_props if prop.key != "std"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, tmp_path / "no_std.onnx")
    with pytest.raises(ValueError, match="lacks preprocessing key.*std"):
        OnnxEmbedder(tmp_path / "no_std.onnx")
