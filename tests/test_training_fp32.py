"""fp32 means fp32: ``--precision fp32`` turns TF32 off (torch's process-wide switches, set without a GPU), and
evaluation during training embeds in fp32 whatever the training precision, as the exported model serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.data
from tests.test_training_trainer import _config, _images
from training.trainer import Trainer


@pytest.fixture
def tf32_allowed():
    """Both TF32 switches on before the test, and restored to what they were after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_precision_fp32_turns_tf32_off_for_matmuls_and_convolutions(tmp_path: Path, tf32_allowed) -> None:
    data = _images(tmp_path / "data")
    assert _tf32() == (True, True)
    Trainer(_config(data, tmp_path / "auto", epochs=1, precision="auto"), progress=False)
    assert _tf32() == (True, True)  # auto (and bf16) leave torch's settings alone
    Trainer(_config(data, tmp_path / "fp32", epochs=1, precision="fp32"), progress=False)
    assert _tf32() == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"  # what allow_tf32 = False means for matmuls


def test_evaluation_embeds_without_autocast_while_training_steps_use_bf16(tmp_path: Path, monkeypatch) -> None:
    asked: list = []
    real = training.data.autocast
    monkeypatch.setattr(training.data, "autocast", lambda device, dtype: asked.append(dtype) or real(device, dtype))
    data = _images(tmp_path / "data")
    trainer = Trainer(_config(data, tmp_path / "run", epochs=1, precision="bf16", image_size=32), progress=False)
    assert trainer.amp_dtype == torch.bfloat16  # the training steps' precision
    trainer.evaluate(-1)
    assert asked and set(asked) == {None}  # every evaluation batch in fp32


@pytest.fixture
def restore_determinism(monkeypatch, tf32_allowed):
    """Undo make_deterministic's process-wide settings after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


def test_deterministic_sets_the_whole_recipe(tmp_path: Path, restore_determinism) -> None:
    import os

    torch.backends.cudnn.benchmark = True
    data = _images(tmp_path / "data")
    Trainer(_config(data, tmp_path / "plain", epochs=1, precision="fp32"), progress=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    Trainer(_config(data, tmp_path / "det", epochs=1, precision="fp32", deterministic=True), progress=False)
    assert _tf32() == (False, False)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_needs_fp32(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deterministic needs precision fp32.*not auto"):
        _config(tmp_path, tmp_path / "run", deterministic=True)
