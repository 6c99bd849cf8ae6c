"""torchvision transforms of the official recipe, built from the same spec the ONNX model carries."""
from __future__ import annotations

import torchvision.transforms as T

from retrieval.preprocessing import Preprocessing

TRAIN_RESIZE_FACTOR = 1.1  # Resize(int(size·1.1)) → RandomCrop(size), as in the official code


def eval_transform(spec: Preprocessing) -> T.Compose:
    """Resize the shorter side → centre crop → tensor → normalise (mirrored by retrieval.preprocessing)."""
    return T.Compose([
        T.Resize(spec.resize_size),
        T.CenterCrop(spec.image_size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: Preprocessing) -> T.Compose:
    """Resize to 1.1× → random crop → horizontal flip → tensor → normalise."""
    return T.Compose([
        T.Resize(int(spec.image_size * TRAIN_RESIZE_FACTOR)),
        T.RandomCrop(spec.image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])
