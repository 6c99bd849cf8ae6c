"""ResNet trunk + linear embedding head, with the projected map used for similarity heatmaps."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from core.errors import UserError
from training.config import Arch, TrainConfig

ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
}
if tuple(ARCHS) != get_args(Arch):
    raise ImportError(f"training.model.ARCHS {tuple(ARCHS)} differs from training.config.Arch {get_args(Arch)}")
_TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class PretrainedWeightsMissing(UserError, FileNotFoundError):
    """ImageNet weights were asked for but are not on this machine."""


class EmbeddingNet(nn.Module):
    """A torchvision ResNet up to its last conv block, then mean pooling and fc → R^d.

    ``forward`` returns the raw (unnormalised) embedding for the losses;
    ``embed_with_map`` returns the unit embedding and the projected map
    W·A_i + b at every location i, whose mean is the raw embedding
    (Stylianou et al., WACV 2019).

    With ``embedding_bn`` a BatchNorm follows fc. Trained from scratch, a ResNet's pooled features are all
    positive and nearly parallel, so every embedding starts in one narrow cone (cosine similarity 0.7–0.8) and
    can collapse into it; centring each dimension over the batch spreads the embeddings over the sphere
    (docs/hard-negatives/ZERO_SHOT.md). In eval mode it is a fixed affine map per dimension, so the projected map
    takes it at every location and its mean is still the embedding.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 512,
        embedding_bn: bool = False,
        *,
        trunk_stages: int = 4,
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if trunk_stages not in (2, 3, 4) or last_stride not in (1, 2):
            raise ValueError(
                f"trunk_stages must be 2, 3 or 4 and last_stride 1 or 2, got {trunk_stages} and {last_stride}"
            )
        builder, _, features = ARCHS[arch]
        resnet = builder(weights=None)
        self.arch, self.dim = arch, dim
        self.trunk_layers = _TRUNK_LAYERS[: len(_TRUNK_LAYERS) - 4 + trunk_stages]
        last_stage = getattr(resnet, self.trunk_layers[-1])
        if last_stride == 1:  # its first block downsamples in a 3×3 conv (conv2 in a Bottleneck) and the shortcut
            block = last_stage[0]
            (block.conv2 if isinstance(block, Bottleneck) else block.conv1).stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        self.trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in self.trunk_layers))
        self.head = nn.Linear(features >> (4 - trunk_stages), dim)
        self.embedding_bn = nn.BatchNorm1d(dim) if embedding_bn else None

    def forward(self, images: Tensor) -> Tensor:
        embedding = self.head(self.trunk(images).mean(dim=(2, 3)))
        return embedding if self.embedding_bn is None else self.embedding_bn(embedding)

    def embed_with_map(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """For a model in eval mode: the embedding BatchNorm, if any, applies its running statistics."""
        feature_map = self.trunk(images).flatten(2).transpose(1, 2)  # [N, Z, C]
        projected = self.head(feature_map)  # [N, Z, d]
        if self.embedding_bn is not None:
            bn = self.embedding_bn
            projected = F.batch_norm(
                projected.flatten(0, 1), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
            ).view_as(projected)
        return F.normalize(projected.mean(dim=1), dim=1), projected

    def load_trunk_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torchvision ResNet state dict (its fc is ignored)."""
        trunk_state = {k: v for k, v in state_dict.items() if k.split(".")[0] in self.trunk_layers}
        missing, unexpected = self.trunk.load_state_dict(trunk_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"pretrained weights do not fit {self.arch}: missing {missing[:3]}…, unexpected {unexpected[:3]}…"
            )


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` once downloaded."""
    url = ARCHS[arch][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def model_of(config: TrainConfig) -> EmbeddingNet:
    """The untrained network that ``config`` describes."""
    return EmbeddingNet(
        config.arch,
        config.dim,
        config.embedding_bn,
        trunk_stages=config.trunk_stages,
        last_stride=config.last_stride,
    )


def build_model(
    arch: str, dim: int, pretrained: str, *, embedding_bn: bool = False, trunk_stages: int = 4, last_stride: int = 2
) -> EmbeddingNet:
    """``pretrained`` is "imagenet" (torchvision's cache), "none" (from scratch) or a file: a torchvision ResNet
    state dict, or a checkpoint of `sct train` (last.pt, best.pt), whose trunk is taken and whose head is not."""
    model = EmbeddingNet(arch, dim, embedding_bn, trunk_stages=trunk_stages, last_stride=last_stride)
    if pretrained == "none":
        return model
    if pretrained == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            raise PretrainedWeightsMissing(
                f"ImageNet weights for {arch} are not in torchvision's cache ({path}). "
                f"Download {ARCHS[arch][1].url} on a machine with internet access and copy it to that path, "
                "or pass --pretrained PATH to a torchvision state dict, or --pretrained none to train from scratch."
            )
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsMissing(f"--pretrained {pretrained}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a checkpoint of `sct train`: its trunk
        state = {key.removeprefix("trunk."): value for key, value in state["model"].items() if key.startswith("trunk.")}
    model.load_trunk_weights(state)
    return model
