"""ONNX export: metadata, dynamic batch, parity with torch, and the heatmap identity of the second output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from retrieval.preprocessing import Preprocessing
from training.config import resolve_config
from training.export import ExportError, export_onnx, load_checkpoint_model
from training.model import EmbeddingNet

#: (embedding_bn, trunk_stages, last_stride) → the side of the feature grid at 64 px
LAYOUTS = {(False, 4, 2): 2, (True, 4, 2): 2, (False, 3, 1): 8}


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=["linear-head", "embedding-bn", "three-stages-stride-1"])
def exported(tmp_path_factory: pytest.TempPathFactory, request) -> tuple[Path, EmbeddingNet]:
    directory = tmp_path_factory.mktemp("export")
    config = resolve_config(
        "folder",
        "unused",
        str(directory),
        overrides=dict(
            arch="resnet18",
            dim=16,
            image_size=64,
            pretrained="none",
            mean=[0.5, 0.4, 0.3],
            std=[0.2, 0.25, 0.3],
            embedding_bn=request.param[0],
            trunk_stages=request.param[1],
            last_stride=request.param[2],
        ),
    )
    torch.manual_seed(0)
    model = EmbeddingNet(
        "resnet18", 16, config.embedding_bn, trunk_stages=request.param[1], last_stride=request.param[2]
    )
    if model.embedding_bn is not None:  # statistics and an affine map far from the identity
        with torch.no_grad():
            model.embedding_bn.running_mean.uniform_(-1, 1)
            model.embedding_bn.running_var.uniform_(0.2, 3)
            model.embedding_bn.weight.uniform_(0.5, 2)
            model.embedding_bn.bias.uniform_(-0.5, 0.5)
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, directory / "best.pt")
    report = export_onnx(directory / "best.pt", directory / "model.onnx")
    assert report.max_abs_diff_embedding <= 1e-4
    model.grid_side = LAYOUTS[request.param]
    return directory / "model.onnx", model.eval()


def test_metadata_carries_the_preprocessing(exported) -> None:
    path, _ = exported
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    spec = Preprocessing.from_metadata(metadata)
    assert (spec.image_size, spec.resize_size) == (64, 64)
    assert spec.mean == pytest.approx((0.5, 0.4, 0.3)) and spec.std == pytest.approx((0.2, 0.25, 0.3))
    assert metadata["embedding_dim"] == "16" and metadata["arch"] == "resnet18"


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_and_parity_with_torch(exported, batch: int) -> None:
    path, model = exported
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    embedding, feature_map = ort.InferenceSession(str(path)).run(None, {"image": images.numpy()})
    with torch.no_grad():
        expected_embedding, expected_map = model.embed_with_map(images)
    assert embedding.shape == (batch, 16) and feature_map.shape == (batch, model.grid_side**2, 16)
    assert np.abs(embedding - expected_embedding.numpy()).max() <= 1e-4
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-5)
    assert np.abs(feature_map - expected_map.numpy()).max() <= 1e-4 * max(1, np.abs(feature_map).max())


def test_heatmap_cells_sum_to_the_cosine(exported) -> None:
    """cos(e_A, e_B) = Σ_i (W·A_i + b)/Z · ê_B / ‖e_A‖ (Stylianou et al. 2019)."""
    path, model = exported
    images = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    embedding, feature_map = ort.InferenceSession(str(path)).run(None, {"image": images})
    raw_a = feature_map[0].mean(axis=0)  # e_A before normalisation
    cells = feature_map[0] @ embedding[1] / (len(feature_map[0]) * np.linalg.norm(raw_a))
    assert cells.shape == (model.grid_side**2,)
    assert cells.sum() == pytest.approx(float(embedding[0] @ embedding[1]), abs=1e-5)


def test_checkpoint_is_loaded_with_weights_only(tmp_path: Path) -> None:
    import argparse

    # any pickled object other than tensors and plain containers must be refused, not executed
    torch.save({"model": {}, "config": {}, "payload": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint_model(tmp_path / "evil.pt")


def test_a_checkpoint_from_elsewhere_is_named(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an sct checkpoint"):
        load_checkpoint_model(tmp_path / "other.pt")


def test_parity_failure_is_an_export_error(exported, tmp_path: Path, monkeypatch) -> None:
    import training.export as export_module

    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", 0.0)
    path, _ = exported
    with pytest.raises(ExportError, match="ONNX Runtime disagrees with torch"):
        export_onnx(path.parent / "best.pt", tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


def test_embedder_matches_the_trainers_evaluation_path(exported, tmp_path: Path) -> None:
    """The same image files through torch (trainer's eval transform) and the ONNX embedder agree to 1e-4."""
    from PIL import Image

    from catalog import load_rgb
    from retrieval.embedder import OnnxEmbedder
    from training.transforms import eval_transform

    path, model = exported
    rng = np.random.default_rng(5)
    files = []
    for i, (height, width) in enumerate([(64, 64), (97, 130), (150, 71), (40, 50)]):  # incl. smaller than the crop
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(files[-1])
    embedder = OnnxEmbedder(path)
    result = embedder.embed_paths(files, batch_size=3, progress=False)
    transform = eval_transform(embedder.preprocessing)
    with torch.no_grad():
        expected, _ = model.embed_with_map(torch.stack([transform(load_rgb(f)) for f in files]))
    assert np.abs(result.embeddings - expected.numpy()).max() <= 1e-4


def test_the_demo_summary_reads_the_grid_of_the_exported_model(exported) -> None:
    from sct.demo import heatmap_grid_side

    path, model = exported
    assert heatmap_grid_side(str(path)) == model.grid_side
