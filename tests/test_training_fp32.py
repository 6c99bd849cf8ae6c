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
