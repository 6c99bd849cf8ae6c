"""uint8 pixels from the loaders + normalisation on the device == torchvision's ToTensor + Normalize, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from retrieval.preprocessing import Preprocessing
from training.transforms import Normalizer, eval_pixels, eval_transform, train_pixels

SPEC = Preprocessing(image_size=24, resize_size=28, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _image(seed: int, size=(41, 33)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _reference(image: Image.Image) -> torch.Tensor:
    """The official recipe's float pipeline, written with torchvision's own ToTensor and Normalize."""
    return T.Compose(
        [T.Resize(SPEC.resize_size), T.CenterCrop(SPEC.image_size), T.ToTensor(), T.Normalize(SPEC.mean, SPEC.std)]
    )(image)


def test_batched_uint8_normalised_equals_totensor_normalize_bit_for_bit():
    images = [_image(seed) for seed in range(4)]
    pixels = torch.stack([eval_pixels(SPEC)(image) for image in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 24, 24)
    expected = torch.stack([_reference(image) for image in images])
    assert torch.equal(Normalizer(SPEC)(pixels), expected)
    assert torch.equal(eval_transform(SPEC)(images[0]), expected[0])


def test_memory_format_is_kept_and_float_input_passes_through():
    pixels = torch.stack([eval_pixels(SPEC)(_image(seed)) for seed in range(2)])
    channels_last = Normalizer(SPEC)(pixels.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, Normalizer(SPEC)(pixels))
    already = torch.randn(2, 3, 24, 24)
    assert Normalizer(SPEC)(already) is already


def test_train_pixels_crop_and_flip_follow_the_seed():
    image = _image(7, size=(60, 45))
    torch.manual_seed(3)
    first = train_pixels(SPEC)(image)
    torch.manual_seed(3)
    assert torch.equal(train_pixels(SPEC)(image), first) and first.shape == (3, 24, 24)
    draws = {train_pixels(SPEC)(image).numpy().tobytes() for _ in range(20)}
    assert len(draws) > 1  # random crops and flips


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_normalising_on_the_gpu_matches_the_cpu():
    pixels = torch.stack([eval_pixels(SPEC)(_image(seed)) for seed in range(3)])
    on_gpu = Normalizer(SPEC)(pixels.cuda()).cpu()
    assert torch.allclose(on_gpu, Normalizer(SPEC)(pixels), atol=1e-6)
