"""Backbones, embedding head, and ImageNet weights from local files only (never a download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from training.config import resolve_config
from training.model import EmbeddingNet, PretrainedWeightsMissing, build_model, imagenet_weights_path, model_of


@pytest.mark.parametrize("arch,features", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("dim", [64, 512])
def test_head_maps_the_trunk_to_the_embedding_size(arch: str, features: int, dim: int) -> None:
    model = EmbeddingNet(arch, dim)
    assert model.head.in_features == features and model.head.out_features == dim
    images = torch.randn(2, 3, 64, 64)
    raw = model(images)
    unit, projected = model.embed_with_map(images)
    assert raw.shape == unit.shape == (2, dim) and projected.shape == (2, 4, dim)
    assert torch.allclose(projected.mean(dim=1), raw, atol=1e-5)  # the map's mean is the raw embedding
    assert torch.allclose(unit, torch.nn.functional.normalize(raw, dim=1), atol=1e-6)


def test_embedding_bn_is_batchnorm_in_training_and_its_running_affine_map_in_the_heatmap() -> None:
    """Training normalises each dimension over the batch; in eval mode the raw embedding is the running-statistics
    affine map of fc's output (computed by hand here), and the projected map's mean is still that embedding."""
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", 8, embedding_bn=True)
    images = torch.rand(6, 3, 64, 64)  # positive pixels: a random network's embeddings share one direction
    plain = EmbeddingNet("resnet18", 8)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("embedding_bn.")})
    with torch.no_grad():
        trained = model(images)
        assert torch.allclose(trained.mean(dim=0), torch.zeros(8), atol=1e-5)  # centred over the batch
        assert torch.allclose(trained.var(dim=0, unbiased=False), torch.ones(8), atol=1e-2)
        model.embedding_bn.weight.uniform_(0.5, 2)
        model.embedding_bn.bias.uniform_(-0.5, 0.5)
        model.eval()
        fc = model.head(model.trunk(images).mean(dim=(2, 3)))
        bn = model.embedding_bn
        by_hand = (fc - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        raw = model(images)
        unit, projected = model.embed_with_map(images)
        cosine = torch.nn.functional.normalize(plain.eval()(images), dim=1)
    assert torch.allclose(raw, by_hand, atol=1e-5)
    assert torch.allclose(projected.mean(dim=1), raw, atol=1e-5)
    assert torch.allclose(unit, torch.nn.functional.normalize(raw, dim=1), atol=1e-6)
    assert (cosine @ cosine.T).min() > 0.5  # without it, every pair of random embeddings points one way
    assert {k for k in model.state_dict() if k.startswith("embedding_bn.")} and "embedding_bn" not in str(plain)


def _torchvision_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    state = _torchvision_state("resnet18", seed=7)
    path = imagenet_weights_path("resnet18")
    assert path.parent == tmp_path / "checkpoints" and path.name.startswith("resnet18-")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_model("resnet18", 16, "imagenet")
    assert torch.equal(model.trunk.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.trunk.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_missing_imagenet_weights_say_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing) as error:
        build_model("resnet50", 16, "imagenet")
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message and "--pretrained none" in message and "--pretrained PATH" in message


def test_pretrained_path_and_wrong_architecture(tmp_path: Path) -> None:
    torch.save({"state_dict": _torchvision_state("resnet34", seed=1)}, tmp_path / "r34.pth")
    model = build_model("resnet34", 8, str(tmp_path / "r34.pth"))
    assert torch.equal(model.trunk.conv1.weight, _torchvision_state("resnet34", seed=1)["conv1.weight"])
    with pytest.raises((ValueError, RuntimeError)):
        build_model("resnet18", 8, str(tmp_path / "r34.pth"))
    with pytest.raises(PretrainedWeightsMissing, match="no such file"):
        build_model("resnet18", 8, str(tmp_path / "absent.pth"))


def test_from_scratch_only_when_asked() -> None:
    a, b = build_model("resnet18", 8, "none"), build_model("resnet18", 8, "none")
    assert not torch.equal(a.trunk.conv1.weight, b.trunk.conv1.weight)  # random init, nothing loaded


def test_a_checkpoint_of_sct_train_starts_the_trunk_and_not_the_head(tmp_path: Path) -> None:
    """`--pretrained runs/old/best.pt`: the previous run's trunk, a new head (the embedding size may differ)."""
    previous = EmbeddingNet("resnet18", 32)
    torch.nn.init.normal_(previous.trunk.layer2[0].conv1.weight)
    torch.save(
        {"model": previous.state_dict(), "epoch": 3, "config": {"arch": "resnet18", "dim": 32}}, tmp_path / "best.pt"
    )
    model = build_model("resnet18", 16, str(tmp_path / "best.pt"))
    for name, value in previous.trunk.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[name], value), name
    assert model.head.out_features == 16
    with pytest.raises((ValueError, RuntimeError)):
        build_model("resnet34", 16, str(tmp_path / "best.pt"))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stages,last_stride,side", [(4, 2, 2), (4, 1, 4), (3, 2, 4), (3, 1, 8)])
def test_trunk_stages_and_last_stride_set_the_feature_grid(arch: str, stages: int, last_stride: int, side: int) -> None:
    """At 64 px: stride 32 for the whole ResNet, halved by dropping the last stage, halved by a last stride of 1;
    the stride-1 stage computes the stride-2 stage's first convolution at every location, not every other one."""
    torch.manual_seed(0)
    model = EmbeddingNet(arch, 8, trunk_stages=stages, last_stride=last_stride).eval()
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    reference.load_state_dict(model.trunk.state_dict(), strict=False)
    full_features = 2048 if arch == "resnet50" else 512
    assert model.head.in_features == full_features >> (4 - stages)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model(images)
        unit, projected = model.embed_with_map(images)
        stem = torch.nn.Sequential(*[getattr(reference, name) for name in model.trunk_layers[:-1]])(images)
        last = model.trunk_layers[-1]
        block, reference_block = getattr(model.trunk, last)[0], getattr(reference, last)[0]
        conv = "conv2" if arch == "resnet50" else "conv1"
        entry = stem if arch != "resnet50" else reference_block.relu(reference_block.bn1(reference_block.conv1(stem)))
        ours, torchvisions = getattr(block, conv)(entry), getattr(reference_block, conv)(entry)
    assert projected.shape == (2, side * side, 8) and torch.allclose(projected.mean(dim=1), raw, atol=1e-5)
    assert torch.allclose(unit, torch.nn.functional.normalize(raw, dim=1), atol=1e-6)
    assert torch.allclose(ours[..., :: 3 - last_stride, :: 3 - last_stride], torchvisions, atol=1e-5)
    assert [name for name, _ in model.trunk.named_children()][-1] == ("layer4" if stages == 4 else "layer3")


def test_three_stage_trunk_takes_the_pretrained_weights_of_its_stages(tmp_path: Path) -> None:
    state = _torchvision_state("resnet18", seed=3)
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model("resnet18", 16, str(tmp_path / "resnet18.pth"), trunk_stages=3, last_stride=1)
    assert torch.equal(model.trunk.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert not hasattr(model.trunk, "layer4")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_the_demo_model_has_a_feature_grid_of_at_least_4x4(cuda: bool) -> None:
    """`sct demo`'s model (the Fashion-MNIST preset, on either device) at its own crop size: its similarity
    heatmaps have at least 4×4 cells."""
    config = resolve_config("fashion-mnist", "unused", "unused", cuda_available=cuda)
    model = model_of(config).eval()
    with torch.no_grad():
        _, projected = model.embed_with_map(torch.zeros(1, 3, config.image_size, config.image_size))
    assert projected.shape[1] >= 16
