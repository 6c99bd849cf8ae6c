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
from PIL import ExifTags, Image, UnidentifiedImageError

from core.errors import UserError

#: Background that transparent pixels are composited on.
_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_UPLOAD = "<upload>"
#: EXIF orientation → the transpose that makes the image upright (the table of ``ImageOps.exif_transpose``).
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageLoadError(UserError):
    """An image could not be loaded; ``path`` says which, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_rgb(path: str | os.PathLike[str], *, min_side: int | None = None) -> Image.Image:
    """Load an image file as RGB, upright according to its EXIF orientation.

    The whole image is decoded here, so truncated files fail now rather than
    later inside a model. Pillow's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) applies. Every failure is an ImageLoadError.
    With ``min_side``, the image may come back smaller, see ``decode_rgb``.
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
        return _decode(file, path, max_pixels=None, min_side=min_side)


def decode_rgb(data: bytes, *, max_pixels: int = 40_000_000, min_side: int | None = None) -> Image.Image:
    """Decode uploaded bytes as RGB, like ``load_rgb``.

    Images that would decode to more than ``max_pixels`` pixels are rejected
    from their header, before any pixel is decoded. With ``min_side`` (the
    shorter side the caller will resize to, times a margin), only that much is
    decoded: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by its DCT (draft
    mode), so ``max_pixels`` applies to that scaled size, and any image is then
    reduced in place by the largest integer factor that keeps its shorter
    side at least ``min_side``. So a 12-megapixel photo costs a few megabytes,
    and memory per decode is bounded by ``max_pixels`` times at most 6 bytes.
    """
    if not data:
        raise ImageLoadError(_UPLOAD, "empty upload (0 bytes)")
    return _decode(io.BytesIO(data), _UPLOAD, max_pixels=max_pixels, min_side=min_side)


def _decode(
    file: BinaryIO, path: str | os.PathLike[str], *, max_pixels: int | None, min_side: int | None
) -> Image.Image:
    """Open, draft, size-check, fully decode, reduce, EXIF-transpose and convert to RGB."""
    try:
        with Image.open(file) as image:
            if min_side is not None:
                image.draft(None, (min_side, min_side))  # JPEG only; a no-op for other formats
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(path, _too_large(width, height, max_pixels))
            image.load()  # the first frame of animated images; truncated data fails here
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            reduced = _reduced(image, min_side) if min_side is not None else image
            upright = _upright(reduced, orientation)
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


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """``image`` shrunk by the largest integer factor that keeps its shorter side at least ``min_side`` (box filter).

    Modes that Pillow cannot reduce are converted first: 16-bit to 32-bit
    integers (the same values, so the scaling to 8 bits is unchanged), and
    palette and bilevel images to what ``_to_rgb`` would make of them.
    Transparent pixels are averaged with their colours unweighted by alpha.
    """
    factor = min(image.size) // min_side
    if factor < 2:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I")
    elif image.mode in ("P", "1"):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    return image.reduce(factor)


def _upright(image: Image.Image, orientation: object) -> Image.Image:
    """``image`` turned upright by an EXIF orientation read from the file (the reduced copy no longer has it)."""
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation)  # type: ignore[arg-type]
    return image if method is None else image.transpose(method)


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
    if image.mode in _SIXTEEN_BIT_MODES:
        # rint(v · 255 / 65535) = rint(v / 257), and v / 257 is never a half: integers do it without a float copy.
        return ((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8)
    with np.errstate(invalid="ignore"):  # damaged float images hold NaN and infinities, mapped below
        values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if image.mode == "I" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)
