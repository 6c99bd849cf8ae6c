"""Robust image loading: any file or upload in, an RGB PIL image or an ImageLoadError out.

Training, indexing and the web app all read images through these two functions,
so a given file becomes the same RGB pixels everywhere.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Background that transparent pixels are composited on.
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_UPLOAD = "<upload>"


class ImageLoadError(Exception):
    """An image could not be loaded; ``path`` says which, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image file as RGB, upright according to its EXIF orientation.

    The whole image is decoded here, so truncated files fail now rather than
    later inside a model. Pillow's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) applies. Every failure is an ImageLoadError.
    """
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(status.st_mode):
        raise ImageLoadError(path, "is a directory, not an image file")
    if status.st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        file = path.open("rb")
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    with file:
        return _decode(file, path, max_pixels=None)


def decode_rgb(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode uploaded bytes as RGB, like ``load_rgb``.

    Images whose declared width × height exceeds ``max_pixels`` are rejected
    from their header, before any pixel is decoded.
    """
    if not data:
        raise ImageLoadError(_UPLOAD, "empty upload (0 bytes)")
    return _decode(io.BytesIO(data), _UPLOAD, max_pixels=max_pixels)


def _decode(file: BinaryIO, path: str | os.PathLike[str], *, max_pixels: int | None) -> Image.Image:
    """Open, size-check, fully decode, EXIF-transpose and convert to RGB."""
    try:
        with Image.open(file) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(path, _too_large(width, height, max_pixels))
            image.load()  # the first frame of animated images; truncated data fails here
            upright = ImageOps.exif_transpose(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports broken data as OSError ("image file is truncated"),
        # SyntaxError (broken headers) or EOFError, depending on the plugin.
        raise ImageLoadError(path, f"truncated or corrupt image data ({exc})") from exc
    except MemoryError:
        raise ImageLoadError(path, "not enough memory to decode this image") from None
    except Exception as exc:
        # Other plugins raise other types on hostile data; fuzzing found RuntimeError (AVIF),
        # NotImplementedError (DDS, BLP), AttributeError (SPIDER) and TypeError (TIFF tags).
        raise ImageLoadError(path, f"corrupt or unsupported image data ({type(exc).__name__}: {exc})") from exc
    try:
        return _to_rgb(upright)
    except (ValueError, TypeError) as exc:
        raise ImageLoadError(path, f"unsupported image mode {upright.mode} ({exc})") from exc


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"image too large: {width}×{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB.

    - transparency (LA, RGBA, PA, P or L with a transparent colour) is composited on white;
    - high-bit-depth modes are scaled to 8 bits by their nominal range:
      I;16* by 65535, I by 65535 when its values fit in 0..65535, F by 1 when its
      values fit in 0..1; other ranges are stretched min..max to 0..255;
    - everything else (1, L, P, CMYK, YCbCr, RGBX, ...) uses Pillow's conversion.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(image), mode="L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _scale_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if image.mode == "I" and low >= 0 and high <= 65535:
            low, high = 0.0, 65535.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)
