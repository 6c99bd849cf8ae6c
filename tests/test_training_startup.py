"""Training starts on a machine without FAISS or ONNX Runtime (a bare GPU machine: CUDA training searches with
TorchKnn, and counts CPUs with core.cpus), and a search that needs FAISS names it when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import numpy as np
import training.trainer, training.cli, training.knn, training.evaluator, training.distributed
from core.cpus import default_workers
from retrieval.metrics import evaluate, knn_exclude_self
from training.knn import TorchKnn

assert default_workers() >= 1
embeddings = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 2]]
labels = [0, 0, 1, 1, 2, 2]
print("recall@1", evaluate(embeddings, labels, ks=(1,), knn=TorchKnn("cpu"))["recall@1"])
try:
    knn_exclude_self(embeddings, embeddings, 1)
except ImportError as error:
    print("error:", error)
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("faiss", "onnxruntime")))
"""


def _blocked(tmp_path: Path) -> dict[str, str]:
    """An environment whose PYTHONPATH puts packages named faiss and onnxruntime first that fail to import."""
    for name in ("faiss", "onnxruntime"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f'raise ImportError("No module named {name!r} (blocked)")\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}


def test_training_imports_and_evaluates_with_torch_knn_without_faiss_or_onnx_runtime(tmp_path: Path) -> None:
    env = _blocked(tmp_path)
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "recall@1 1.0" in lines  # each point's only neighbour of its class is its twin
    error = next(line for line in lines if line.startswith("error:"))
    assert "needs FAISS (the faiss-cpu package)" in error and "'faiss' (blocked)" in error
    assert "loaded: []" in lines


def test_the_blocking_packages_do_block(tmp_path: Path) -> None:
    """Guards the test above: with the same PYTHONPATH, importing faiss or onnxruntime fails."""
    env = _blocked(tmp_path)
    for name in ("faiss", "onnxruntime"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env, capture_output=True)
        assert result.returncode != 0 and b"blocked" in result.stderr
