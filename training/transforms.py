"""torchvision transforms of the official recipe, built from the same spec the ONNX model carries.

The data loaders decode, resize and crop on the CPU and hand over uint8
tensors (``eval_pixels``, ``train_pixels``); ``Normalizer`` turns a batch of
them into the model's float input on the device. That is the same arithmetic
as ToTensor + Normalize (÷255, −mean, ÷std), but it moves a quarter of the
bytes between processes and to the GPU, and takes the float work off the
decoding processes: 1.5× the training loader's images/s at 256 px on 2
cores (benchmarks/results/gpu_speed.md). ``eval_transform`` is the whole
float pipeline, for one image at a time.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T

from retrieval.preprocessing import Preprocessing

TRAIN_RESIZE_FACTOR = 1.1  # Resize(int(size·1.1)) → RandomCrop(size), as in the official code


def eval_pixels(spec: Preprocessing) -> T.Compose:
    """Resize the shorter side → centre crop → uint8 tensor [3, H, W] (mirrored by retrieval.preprocessing)."""
    return T.Compose([T.Resize(spec.resize_size), T.CenterCrop(spec.image_size), T.PILToTensor()])


def train_pixels(spec: Preprocessing) -> T.Compose:
    """Resize to 1.1× → random crop → horizontal flip → uint8 tensor [3, H, W]."""
    return T.Compose(
        [
            T.Resize(int(spec.image_size * TRAIN_RESIZE_FACTOR)),
            T.RandomCrop(spec.image_size),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


class Normalizer:
    """uint8 images [..., 3, H, W] → float32 model input ((x / 255 − mean) / std), on the images' device.

    Float input passes through unchanged: it is taken to be normalised already.
    The result keeps the input's memory format (so channels_last stays so).
    """

    def __init__(self, spec: Preprocessing) -> None:
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return images
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div_(255).sub_(self.mean).div_(self.std)


def eval_transform(spec: Preprocessing) -> T.Compose:
    """``eval_pixels`` then normalised: one image's float model input."""
    return T.Compose([eval_pixels(spec), Normalizer(spec)])
