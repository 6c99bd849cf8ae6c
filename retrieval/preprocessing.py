"""Numpy mirror of the evaluation transform, so serving needs no torch.

``preprocess`` reproduces, on a PIL RGB image, torchvision's

    Compose([Resize(resize_size), CenterCrop(image_size), ToTensor(), Normalize(mean, std)])

step by step: the same output size for the shorter-side resize, the same
Pillow bilinear call (Pillow always antialiases), the same zero padding and
crop offsets when the image is smaller than the crop, and the same float32
arithmetic. The parity test holds it to 1e-4 of torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.errors import UserValueError

RESIZE_RULE = "resize_shorter_bilinear_then_center_crop"
_METADATA_KEYS = ("image_size", "resize_size", "mean", "std", "resize_rule")
#: Images are decoded down to no less than this many times the resize target (catalog.decode_rgb's ``min_side``),
#: so that the bilinear resize still filters over several decoded pixels. Measured on a noisy 12-megapixel image,
#: the model input then differs from a full decode's by 0.2/255 on average at 256 px and 4/255 at 32 px.
DECODE_MARGIN = 4
#: Beyond this many pixels (48 MiB of RGB) a resize covers only the centre crop: see _resized_center.
_MAX_RESIZED_PIXELS = 1 << 24


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into model input; stored in the ONNX model's metadata."""

    image_size: int  # side of the square crop fed to the model
    resize_size: int  # the shorter side is resized to this before cropping
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.resize_size <= 0:
            raise ValueError(f"image_size and resize_size must be positive, got {self.image_size}, {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")

    @property
    def decode_side(self) -> int:
        """The shorter side worth decoding an image to for this preprocessing (``min_side`` of catalog's loaders)."""
        return DECODE_MARGIN * self.resize_size

    def to_metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries that describe this preprocessing."""
        return {
            "image_size": str(self.image_size),
            "resize_size": str(self.resize_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "resize_rule": RESIZE_RULE,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Preprocessing:
        """Parse the entries written by ``to_metadata``; other keys are ignored."""
        missing = [key for key in _METADATA_KEYS if key not in meta]
        if missing:
            raise UserValueError(f"model metadata lacks preprocessing key(s): {', '.join(missing)}")
        if meta["resize_rule"] != RESIZE_RULE:
            rule = meta["resize_rule"]
            raise UserValueError(f"model metadata resize_rule is {rule!r}; only {RESIZE_RULE!r} is supported")
        return cls(
            image_size=_parse_int(meta, "image_size"),
            resize_size=_parse_int(meta, "resize_size"),
            mean=_parse_triple(meta, "mean"),
            std=_parse_triple(meta, "std"),
        )


def _parse_int(meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise UserValueError(f"model metadata {key} must be an integer, got {meta[key]!r}") from None


def _parse_triple(meta: Mapping[str, str], key: str) -> tuple[float, float, float]:
    try:
        values = json.loads(meta[key])
        if not isinstance(values, list) or len(values) != 3:
            raise ValueError
        return (float(values[0]), float(values[1]), float(values[2]))
    except (ValueError, TypeError):
        raise UserValueError(f"model metadata {key} must be a JSON list of 3 numbers, got {meta[key]!r}") from None


def preprocess(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One PIL image to the model's float32 input of shape [3, S, S]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = np.asarray(_resized_center(image, spec.resize_size, spec.image_size))
    pixels = _center_crop(pixels, spec.image_size)
    scaled = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (scaled - mean) / std


def preprocess_batch(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """Several PIL images to one float32 array of shape [N, 3, S, S]."""
    if not images:
        return np.zeros((0, 3, spec.image_size, spec.image_size), dtype=np.float32)
    return np.stack([preprocess(image, spec) for image in images])


def _resized_center(image: Image.Image, size: int, crop: int) -> Image.Image:
    """torchvision ``Resize(size)`` (the longer side truncated, not rounded), with bounded memory.

    Normally the whole image is resized. When that would exceed
    ``_MAX_RESIZED_PIXELS`` (a hostile 1 × 200,000 upload resized to a shorter
    side of 292 would need 51 GB), only the window that ``_center_crop`` keeps
    is resampled, with Pillow's ``box``: the same filter positions, but its
    fixed-point rounding differs by up to 2/255 per pixel from a whole resize.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return image
    if new_width * new_height <= _MAX_RESIZED_PIXELS:
        return image.resize((new_width, new_height), Image.BILINEAR)
    left, kept_width = _centered_window(new_width, crop)
    top, kept_height = _centered_window(new_height, crop)
    x_scale, y_scale = width / new_width, height / new_height
    box = (left * x_scale, top * y_scale, (left + kept_width) * x_scale, (top + kept_height) * y_scale)
    return image.resize((kept_width, kept_height), Image.BILINEAR, box=box)


def _centered_window(length: int, crop: int) -> tuple[int, int]:
    """(start, length) along one axis of what ``_center_crop`` keeps; a side shorter than the crop is kept whole."""
    if length <= crop:
        return 0, length
    return int(round((length - crop) / 2.0)), crop


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)``: zero-pad a side smaller than the crop, then crop.

    Padding puts the odd pixel on the right/bottom; the crop offset uses
    Python's round (half to even), as torchvision does.
    """
    height, width = pixels.shape[:2]
    if size > width or size > height:
        pad_w = max(size - width, 0)
        pad_h = max(size - height, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = pixels.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return pixels[top : top + size, left : left + size]
