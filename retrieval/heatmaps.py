"""Similarity heatmaps (Stylianou, Souvenir and Pless, WACV 2019): where two images are alike.

The exported model gives, per image, the projected last conv map F [Z, d]
(``feature_map``) whose mean over the Z = h·w locations is the embedding before
normalisation. So the cosine of images A and B splits exactly into one term
per location of A:

    cos(A, B) = Σ_i F_A[i]·ê_B / (Z·‖mean_i F_A[i]‖)

and symmetrically for B. ``contribution_grid`` computes these terms as an
h×w grid; ``render_heatmap`` draws a grid over the image the model saw.
"""

from __future__ import annotations

import io
import math
from functools import cache

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from retrieval.preprocessing import Preprocessing, preprocess

#: Diverging colour map centred on 0: red cells add to the similarity, blue cells take from it.
COLORMAP = "coolwarm"
#: The image and its colours are blended half and half.
BLEND = 0.5
#: Small images are enlarged by a whole factor (nearest neighbour) to at least this side.
MIN_SIDE = 256
#: Width of the colour bar panel on the right of the image: bar, ticks and labels.
BAR_PANEL = 84
_BAR_WIDTH = 14
_MARGIN = 8
_FONT_SIZE = 13
_TEXT = (110, 118, 130, 255)  # mid grey, readable on light and dark pages; the panel is transparent


def contribution_grid(feature_map: np.ndarray, other_embedding: np.ndarray) -> np.ndarray:
    """Each location's share of the cosine between this image and another: float64 [h, w].

    ``feature_map`` [Z, d] is this image's projected map, ``other_embedding``
    [d] the other image's unit embedding. The cells sum to the cosine. The
    model's grid is square, so h = w = √Z.
    """
    feature_map = np.asarray(feature_map, dtype=np.float64)
    other_embedding = np.asarray(other_embedding, dtype=np.float64)
    if feature_map.ndim != 2 or other_embedding.shape != feature_map.shape[1:]:
        raise ValueError(
            f"feature_map must be [Z, d] and other_embedding [d], got {list(feature_map.shape)} "
            f"and {list(other_embedding.shape)}"
        )
    locations = feature_map.shape[0]
    side = math.isqrt(locations)
    if side * side != locations:
        raise ValueError(f"feature_map has {locations} locations, not a square grid")
    pooled_norm = np.linalg.norm(feature_map.mean(axis=0))
    return (feature_map @ other_embedding / (locations * pooled_norm)).reshape(side, side)


def displayed_image(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """The crop the model sees (resized, center-cropped, zero-padded if small) as an RGB image."""
    return crop_of(preprocess(image, spec), spec)


def crop_of(pixels: np.ndarray, spec: Preprocessing) -> Image.Image:
    """The RGB image of preprocessed ``pixels`` [3, S, S]: undoing the normalisation gives back
    exactly the pixels the embedding was computed from."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    restored = np.rint((pixels * std + mean) * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(restored.transpose(1, 2, 0)))


def symmetric_limit(*grids: np.ndarray) -> float:
    """The colour scale ±limit that fits every grid, so the two sides of a pair compare directly."""
    return max(float(np.abs(grid).max()) for grid in grids) or 1e-12


def render_heatmap(image: Image.Image, grid: np.ndarray, limit: float | None = None) -> bytes:
    """PNG of ``grid`` upsampled over ``image`` (colour map, blended at 0.5), with a colour bar on the right.

    ``image`` is the displayed crop (``displayed_image``); an image smaller
    than MIN_SIDE is enlarged by a whole factor. The colours span ±``limit``
    (default: the grid's largest magnitude). The PNG is heatmap_size(image)
    pixels: the enlarged image plus BAR_PANEL on the right.
    """
    limit = symmetric_limit(grid) if limit is None else limit
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    width, side = heatmap_size(image)
    base = image.convert("RGB").resize((side, side), Image.NEAREST)
    cells = Image.fromarray(np.asarray(grid, dtype=np.float32)).resize((side, side), Image.BILINEAR)
    colours = _colours(np.asarray(cells) / (2 * limit) + 0.5)
    canvas = Image.new("RGBA", (width, side), (0, 0, 0, 0))
    canvas.paste(Image.blend(base, colours, BLEND), (0, 0))
    _draw_colour_bar(canvas, left=side + _MARGIN, limit=limit)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def heatmap_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the PNG that ``render_heatmap`` draws for ``image``, a square crop."""
    if image.width != image.height:
        raise ValueError(f"heatmaps are drawn over the model's square crop, got a {image.width}×{image.height} image")
    side = image.width * max(1, math.ceil(MIN_SIDE / image.width))
    return side + BAR_PANEL, side


def _colours(values: np.ndarray) -> Image.Image:
    """Values in [0, 1] through the colour map, as an RGB image."""
    rgba = colormaps[COLORMAP](np.clip(values, 0, 1), bytes=True)
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


def _draw_colour_bar(canvas: Image.Image, *, left: int, limit: float) -> None:
    """A vertical bar from +limit (top) to −limit (bottom), with three labelled ticks."""
    font = _font()
    half_text = _FONT_SIZE // 2 + 1
    top, bottom = half_text, canvas.height - half_text
    ramp = np.linspace(1, 0, bottom - top)[:, None].repeat(_BAR_WIDTH, axis=1)
    canvas.paste(_colours(ramp), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, top, left + _BAR_WIDTH - 1, bottom - 1), outline=_TEXT)
    for value, y in ((limit, top), (0.0, (top + bottom) // 2), (-limit, bottom - 1)):
        draw.line((left + _BAR_WIDTH, y, left + _BAR_WIDTH + 3, y), fill=_TEXT)
        draw.text((left + _BAR_WIDTH + 6, y), _tick_label(value), fill=_TEXT, font=font, anchor="lm")


def _tick_label(value: float) -> str:
    return "0" if value == 0 else f"{value:+.2g}"


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=_FONT_SIZE)
