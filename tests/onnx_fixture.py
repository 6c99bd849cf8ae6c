"""A tiny ONNX model that honours the model contract, built without torch, and images it can tell apart.

The model averages the preprocessed image over a GRID × GRID grid of cells
(Z = GRID² locations of 3 channels), projects each cell with a fixed random
affine map to d dimensions ("feature_map" [N, Z, d]), and L2-normalises the
mean over cells ("embedding" [N, d]), the same structure as the real exported
ResNet (docs/ARCHITECTURE.md, "ONNX model").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

GRID = 4
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


def tiny_model_weights(*, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The projection (W [3, d], b [d]) that ``make_tiny_model`` bakes in, for independent checks."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, dim)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(dim)).astype(np.float32)
    return weight, bias


def make_tiny_model(path: str | Path, *, image_size: int = 16, dim: int = 8, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` and return it; image_size must be a multiple of GRID."""
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    cell = image_size // GRID
    zones = GRID * GRID
    weight, bias = tiny_model_weights(dim=dim, seed=seed)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["cells"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Reshape", ["cells", "cells_shape"], ["cells_flat"]),  # [N, 3, Z]
        helper.make_node("Transpose", ["cells_flat"], ["locations"], perm=[0, 2, 1]),  # [N, Z, 3]
        helper.make_node("MatMul", ["locations", "W"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["feature_map"]),  # [N, Z, d]
        helper.make_node("ReduceMean", ["feature_map"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("LpNormalization", ["pooled"], ["embedding"], axis=1, p=2),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0, 3, zones], dtype=np.int64), "cells_shape"),
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, image_size, image_size])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim]),
            helper.make_tensor_value_info("feature_map", TensorProto.FLOAT, ["N", zones, dim]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {
        "image_size": str(image_size),
        "resize_size": str(image_size + image_size // 4),
        "mean": json.dumps(list(MEAN)),
        "std": json.dumps(list(STD)),
        "resize_rule": "resize_shorter_bilinear_then_center_crop",
        "embedding_dim": str(dim),
        "arch": "tiny-avgpool",
        "dataset": "synthetic",
    }
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def make_color_images(
    directory: str | Path,
    *,
    classes: dict[str, tuple[int, int, int]] = COLORS,
    per_class: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Write ``directory/<class>/<i>.png``: noisy images of the class colour, in varied sizes."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, color in classes.items():
        (Path(directory) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(13, 41, size=2))
            noise = rng.integers(-25, 26, size=(height, width, 3))
            pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
            path = Path(directory) / name / f"{i}.png"
            Image.fromarray(pixels, "RGB").save(path)
            paths.append(path)
    return paths
