"""Training precision: bf16 autocast on the CPU falls back to fp32 where its kernels get gradients wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sct.cli import main
from tests.test_training_trainer import _config, _images
from training.model import EmbeddingNet
from training.precision import autocast, single_pixel_strided_convs
from training.trainer import Trainer


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _expected(arch: str, image_size: int, trunk_stages: int, last_stride: int) -> list[str]:
    """The strided convolutions with a 1×1 input, by the convolution arithmetic of torchvision's ResNets:
    a 7×7/2 stem, a 3×3/2 max pool, then stages 2-4 whose first block halves the map in its 3×3 convolution
    (conv1 of a basic block, conv2 of a bottleneck) and in its 1×1/2 downsample, both fed the block's input."""
    found = ["trunk.conv1"] if image_size == 1 else []
    size = _out(_out(image_size, 7, 2, 3), 3, 2, 1)
    strided = "conv1" if arch == "resnet18" else "conv2"
    for stage in range(2, trunk_stages + 1):
        stride = last_stride if stage == 4 else 2
        if stride > 1 and size == 1:
            found += [f"trunk.layer{stage}.0.{strided}", f"trunk.layer{stage}.0.downsample.0"]
        size = _out(size, 3, stride, 1)
    return found


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("trunk_stages,last_stride", [(4, 2), (4, 1), (3, 2), (2, 2)])
def test_single_pixel_strided_convs_match_the_convolution_arithmetic(
    arch: str, trunk_stages: int, last_stride: int
) -> None:
    model = EmbeddingNet(arch, 8, True, trunk_stages=trunk_stages, last_stride=last_stride).train()
    statistics = [b.clone() for b in model.buffers()]
    seen = []
    for size in [1, 2, 4, 8, 9, 15, 16, 17, 24, 32, 33]:
        found = single_pixel_strided_convs(model, size)
        assert found == _expected(arch, size, trunk_stages, last_stride), size
        seen += found
    assert seen  # the sizes above reach the case for every layout
    assert model.training  # the mode it came in, and its BatchNorm statistics untouched
    assert all(torch.equal(a, b) for a, b in zip(statistics, model.buffers()))
    assert not model.trunk.conv1._forward_pre_hooks


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU reports native bf16, as the machines with AVX512-BF16 or AMX do: "auto" picks bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)


@pytest.mark.parametrize("image_size,expected", [(16, None), (32, torch.bfloat16)])
def test_auto_trains_in_fp32_where_a_strided_conv_sees_one_pixel(
    tmp_path: Path, native_bf16: None, capsys: pytest.CaptureFixture, image_size: int, expected: torch.dtype | None
) -> None:
    trainer = Trainer(_config(_images(tmp_path / "data"), tmp_path / "run", image_size=image_size), progress=False)
    assert trainer.amp_dtype == expected
    said = capsys.readouterr().out
    if expected is None:
        assert "precision: fp32, not bf16: at image size 16 the strided convolution trunk.layer4.0.conv1" in said
    else:
        assert "precision" not in said


def test_a_training_step_at_16_px_gets_the_weight_gradients_of_fp64(tmp_path: Path, native_bf16: None) -> None:
    """The reason for the fallback: in bf16, layer4's first convolution (1×1 input at 16 px) got weight gradients
    3 to 1e37 times too large on the CPU. The step the trainer takes matches the same step in float64."""
    trainer = Trainer(_config(_images(tmp_path / "data"), tmp_path / "run", image_size=16), progress=False)
    torch.manual_seed(0)
    images, weights = torch.randn(8, 3, 16, 16), torch.randn(8, 8, dtype=torch.float64)

    def gradient(model: torch.nn.Module, dtype: torch.dtype, amp: torch.dtype | None) -> torch.Tensor:
        model.zero_grad()
        with autocast(torch.device("cpu"), amp):
            out = model(images.to(dtype).contiguous(memory_format=torch.channels_last))
        (out.double() * weights).sum().backward()
        return model.trunk.layer4[0].conv1.weight.grad.double().clone()

    model = trainer.model.train()
    taken = gradient(model, torch.float32, trainer.amp_dtype)
    reference = gradient(model.double(), torch.float64, None)
    assert torch.isfinite(taken).all()
    assert (taken - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_bf16_asked_for_at_16_px_on_the_cpu_is_refused(
    tmp_path: Path, native_bf16: None, capsys: pytest.CaptureFixture
) -> None:
    data = _images(tmp_path / "data")
    run = tmp_path / "run"
    flags = "--device cpu --arch resnet18 --pretrained none --image-size 16 --precision bf16 --epochs 1"
    argv = ["train", "--dataset", "folder", "--data-root", str(data), "--out", str(run), *flags.split()]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--precision bf16 on the CPU: at image size 16 the strided convolution trunk.layer4.0.conv1" in err
    assert "--precision fp32" in err
    assert not run.exists()
