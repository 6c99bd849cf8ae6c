"""Export a trained checkpoint to ONNX: unit embedding + projected feature map, with preprocessing metadata.

The export is checked twice: ``onnx.checker`` on the graph, then ONNX Runtime
against torch on random and real images (max |diff| ≤ 1e-4).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

import catalog
from core.atomic import atomic_file
from core.errors import UserFileNotFoundError, UserValueError
from retrieval.preprocessing import preprocess_batch
from training.config import TrainConfig
from training.model import EmbeddingNet, model_of
from training.trainer import preprocessing_of

PARITY_TOLERANCE = 1e-4
OPSET = 18


class ExportError(ValueError):
    """The exported graph failed a check."""


class _EmbeddingWithMap(nn.Module):
    def __init__(self, model: EmbeddingNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.embed_with_map(image)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff_embedding: float
    max_abs_diff_feature_map: float
    images_checked: int


def load_checkpoint_model(checkpoint: str | Path) -> tuple[EmbeddingNet, TrainConfig]:
    """The model and config stored in a checkpoint (loaded with weights_only=True)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UserFileNotFoundError(f"checkpoint {checkpoint} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "config"):
        if key not in state:
            raise UserValueError(f"{checkpoint} is not an sct checkpoint: it has no {key!r} entry")
    config = TrainConfig(**state["config"])
    model = model_of(config)
    model.load_state_dict(state["model"])
    return model.eval(), config


def export_onnx(checkpoint: str | Path, out: str | Path, *, parity_images: Sequence[str] = ()) -> ExportReport:
    """Write ``out`` atomically, after the checker and the parity check pass."""
    model, config = load_checkpoint_model(checkpoint)
    spec = preprocessing_of(config)
    wrapper = _EmbeddingWithMap(model).eval()
    example = torch.randn(2, 3, config.image_size, config.image_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "raw.onnx"
        torch.onnx.export(
            wrapper,
            (example,),
            str(raw),
            input_names=["image"],
            output_names=["embedding", "feature_map"],
            dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
        graph = onnx.load(str(raw))
        metadata = {
            **spec.to_metadata(),
            "embedding_dim": str(config.dim),
            "arch": config.arch,
            "dataset": config.dataset,
            "loss": config.loss,
        }
        onnx.helper.set_model_props(graph, metadata)
        onnx.checker.check_model(graph, full_check=True)
        with atomic_file(out) as temporary:
            onnx.save(graph, str(temporary))
            report = _parity_check(wrapper, temporary, spec, parity_images)
    return ExportReport(out, *report)


def _parity_check(wrapper: nn.Module, onnx_path: Path, spec, parity_images: Sequence[str]) -> tuple[float, float, int]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, spec.image_size, spec.image_size, generator=generator).numpy()]
    if parity_images:
        batches.append(preprocess_batch([catalog.load_rgb(p) for p in parity_images], spec))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst_embedding = worst_map = 0.0
    for batch in batches:
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(torch.from_numpy(batch))]
        embedding, feature_map = session.run(["embedding", "feature_map"], {"image": batch})
        worst_embedding = max(worst_embedding, float(np.abs(embedding - expected[0]).max()))
        worst_map = max(worst_map, float(np.abs(feature_map - expected[1]).max() / max(1.0, np.abs(expected[1]).max())))
    if worst_embedding > PARITY_TOLERANCE or worst_map > PARITY_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime disagrees with torch: max |diff| {worst_embedding:.2e} on the embedding, "
            f"{worst_map:.2e} (relative) on the feature map; tolerance {PARITY_TOLERANCE:.0e}"
        )
    return worst_embedding, worst_map, sum(len(b) for b in batches)


def parity_sample(checkpoint: str | Path, count: int) -> list[str]:
    """Paths of up to ``count`` test images of the checkpoint's dataset, evenly spread; [] if it is gone."""
    if count <= 0:
        return []
    _, config = load_checkpoint_model(checkpoint)
    try:
        records = catalog.select_split(catalog.read_dataset(config.dataset, config.data_root), "test")
    except (OSError, ValueError, catalog.DatasetError) as error:
        print(f"note: parity check on random inputs only; the run's dataset is unavailable ({error})")
        return []
    step = max(1, len(records) // count)
    return [record.path for record in records[::step][:count]]
