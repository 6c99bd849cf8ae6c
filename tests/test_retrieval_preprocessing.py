"""``retrieval.preprocess`` against the torchvision evaluation transform it mirrors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrieval.preprocessing import RESIZE_RULE, Preprocessing, preprocess, preprocess_batch

T = pytest.importorskip("torchvision.transforms")

IMAGENET = Preprocessing(image_size=32, resize_size=36, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def torchvision_transform(spec: Preprocessing):
    return T.Compose(
        [
            T.Resize(spec.resize_size),
            T.CenterCrop(spec.image_size),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (37, 53),  # odd-sized portrait
        (101, 47),  # odd-sized landscape: the long side's new length truncates
        (36, 36),  # already resize_size: no resize at all
        (64, 64),
        (75, 50),  # 1.5 aspect: 54 after resize, crop offset 11
        (9, 7),  # smaller than both sizes: upscaled
        (500, 3),  # extreme aspect
    ],
)
@pytest.mark.parametrize("spec", [IMAGENET, Preprocessing(31, 33, (0.5, 0.5, 0.5), (0.25, 0.3, 0.2))])
def test_matches_torchvision(width: int, height: int, spec: Preprocessing):
    image = random_image(width, height, seed=width * height)
    expected = torchvision_transform(spec)(image).numpy()
    actual = preprocess(image, spec)
    assert actual.shape == expected.shape == (3, spec.image_size, spec.image_size)
    assert actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize(("resize_size", "image_size"), [(20, 31), (21, 32), (24, 25)])
@pytest.mark.parametrize(("width", "height"), [(30, 45), (47, 21)])
def test_crop_larger_than_resized_image_pads_like_torchvision(resize_size, image_size, width, height):
    spec = Preprocessing(image_size, resize_size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    image = random_image(width, height, seed=7)
    expected = torchvision_transform(spec)(image).numpy()
    actual = preprocess(image, spec)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4


def test_batch_stacks_single_results_and_converts_other_modes():
    images = [random_image(40, 30, seed=1), random_image(30, 50, seed=2).convert("L")]
    batch = preprocess_batch(images, IMAGENET)
    assert batch.shape == (2, 3, 32, 32)
    assert np.array_equal(batch[1], preprocess(images[1].convert("RGB"), IMAGENET))
    assert preprocess_batch([], IMAGENET).shape == (0, 3, 32, 32)


def test_metadata_round_trip_and_errors_name_the_key():
    meta = IMAGENET.to_metadata()
    assert meta["resize_rule"] == RESIZE_RULE and json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    assert all(isinstance(value, str) for value in meta.values())
    assert Preprocessing.from_metadata({**meta, "arch": "resnet50"}) == IMAGENET
    with pytest.raises(ValueError, match="std"):
        Preprocessing.from_metadata({k: v for k, v in meta.items() if k != "std"})
    with pytest.raises(ValueError, match="mean"):
        Preprocessing.from_metadata({**meta, "mean": "[0.5, 0.5]"})
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing.from_metadata({**meta, "image_size": "big"})
    with pytest.raises(ValueError, match="resize_rule"):
        Preprocessing.from_metadata({**meta, "resize_rule": "squash"})
