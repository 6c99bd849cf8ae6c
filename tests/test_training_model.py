"""Backbones, embedding head, and ImageNet weights from local files only (never a download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from training.model import EmbeddingNet, PretrainedWeightsMissing, build_model, imagenet_weights_path


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
