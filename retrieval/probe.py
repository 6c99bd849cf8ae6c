"""The probe: a fixed synthetic image whose embedding identifies what a model computes, not just its file.

``build_gallery`` stores the model's embedding of the probe in the manifest;
``Gallery.load`` embeds the probe again with the folder's model.onnx and refuses
the gallery when the cosine between the two is below ``MIN_COSINE``. So a model
swapped in with its sha256 edited into the manifest is caught: it embeds the
probe differently. The same model on another machine or execution provider
stays far above the threshold.

The pixels come from integer arithmetic only (no random generator, no
floating-point function such as sin, whose last bits differ between numpy
builds), so they are the same bytes everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from retrieval.preprocessing import Preprocessing, preprocess

MIN_COSINE = 0.999


def probe_image(size: int) -> Image.Image:
    """A ``size`` × ``size`` RGB image: horizontal and vertical ramps, and a checkerboard crossed by a moiré."""
    y, x = np.indices((size, size), dtype=np.int64)
    red = x * 255 // max(size - 1, 1)
    green = (size - 1 - y) * 255 // max(size - 1, 1)
    blue = (x // 8 + y // 8) % 2 * 160 + (x * y) % 96
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8), "RGB")


def probe_pixels(spec: Preprocessing) -> np.ndarray:
    """The probe as model input [1, 3, S, S]; drawn at the resize size, so preprocessing only crops and
    normalises it (no resampling whose rounding could change between Pillow versions)."""
    return preprocess(probe_image(spec.resize_size), spec)[None]
