"""Photo-like images of realistic sizes (0.1 to 15 MB) in the formats people upload, made on the fly.

A photo's bytes look random to a multipart parser and compress like a photo:
a smooth random scene plus sensor-like noise, encoded the way cameras, phones,
scanners and screenshots write them. Every search upload test before these was
a few kilobytes, so nothing caught that most photos over a megabyte were
refused (413). ``photo_corpus()`` is deterministic and cached per process.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: EXIF orientation 6: the stored pixels must be turned 90° clockwise to be upright (a phone held upright).
ROTATED_90 = 6


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    mime: str


def scene(width: int, height: int, *, seed: int, noise: int = 10) -> Image.Image:
    """A photo-like RGB image: a smooth random scene plus per-pixel noise of about ``noise`` levels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 96 + 2, width // 96 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    grain = rng.integers(-noise, noise + 1, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def rotated_jpeg(upright: Image.Image, **params) -> bytes:
    """``upright`` stored as a phone stores it: pixels turned 90° counter-clockwise, EXIF orientation 6."""
    exif = Image.Exif()
    exif[0x0112] = ROTATED_90
    return encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, **params)


def sixteen_bit_scan(width: int, height: int, *, seed: int) -> Image.Image:
    """A 16-bit greyscale image (mode I;16), as scanners and microscopes write PNG and TIFF."""
    grey = np.asarray(scene(width, height, seed=seed, noise=6).convert("L"), dtype=np.uint16)
    return Image.fromarray(grey * 257 + np.uint16(seed % 200))


@functools.cache
def photo_corpus() -> tuple[Photo, ...]:
    """About a dozen photos from 0.1 to 15 MB: JPEG (baseline, progressive, CMYK, EXIF-rotated, 24 MP),
    PNG (RGB, RGBA, 16-bit), WebP and TIFF."""
    phone = scene(4032, 3024, seed=2)
    transparent = scene(2000, 1500, seed=7).convert("RGBA")
    transparent.putalpha(Image.linear_gradient("L").resize(transparent.size))
    photos = [
        Photo("small-800x600.jpg", encoded(scene(800, 600, seed=0), "JPEG", quality=90), "image/jpeg"),
        Photo("photo-1600x1200.jpg", encoded(scene(1600, 1200, seed=1, noise=20), "JPEG", quality=94),
              "image/jpeg"),
        Photo("phone-4032x3024-rotated.jpg", rotated_jpeg(phone, quality=92), "image/jpeg"),
        Photo("camera-6000x4000.jpg", encoded(scene(6000, 4000, seed=3, noise=26), "JPEG", quality=95),
              "image/jpeg"),
        Photo("progressive-3000x2000.jpg",
              encoded(scene(3000, 2000, seed=4), "JPEG", quality=90, progressive=True), "image/jpeg"),
        Photo("print-2400x1600-cmyk.jpg", encoded(scene(2400, 1600, seed=5).convert("CMYK"), "JPEG", quality=90),
              "image/jpeg"),
        Photo("screenshot-2560x1440.png", encoded(scene(2560, 1440, seed=6, noise=3), "PNG", compress_level=1),
              "image/png"),
        Photo("transparent-2000x1500.png", encoded(transparent, "PNG", compress_level=1), "image/png"),
        Photo("scan-3000x2000-16bit.png", encoded(sixteen_bit_scan(3000, 2000, seed=8), "PNG", compress_level=1),
              "image/png"),
        Photo("photo-3000x2000.webp", encoded(scene(3000, 2000, seed=9), "WEBP", quality=90, method=0),
              "image/webp"),
        Photo("scan-2000x1500.tif", encoded(scene(2000, 1500, seed=10), "TIFF"), "image/tiff"),
        Photo("scan-2000x1500-16bit.tif", encoded(sixteen_bit_scan(2000, 1500, seed=11), "TIFF"), "image/tiff"),
    ]
    return tuple(photos)


def amplifier_png(side: int = 6300) -> bytes:
    """A 16-bit greyscale PNG of side² pixels (40 megapixels by default, just under the server's limit) that
    compresses to a few hundred KB: the most memory one upload can ask of a decoder."""
    ramp = np.add.outer(np.arange(side, dtype=np.uint32) * 7, np.arange(side, dtype=np.uint32) * 3) % 65536
    return encoded(Image.fromarray(ramp.astype(np.uint16)), "PNG")


def boundary_at_every_read(total: int, chunk: int, *, offset: int) -> bytes:
    """``total`` photo-like bytes with a CR at the last byte of every ``chunk``-byte read of a request body whose
    file data starts at byte ``offset``: the worst case for a multipart parser that holds back the bytes that
    might start a boundary."""
    data = bytearray(np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8).tobytes())
    data = data.replace(b"\r", b"R").replace(b"\n", b"N")
    for end in range(chunk, offset + total + 1, chunk):
        if end - 1 >= offset:
            data[end - 1 - offset] = ord("\r")
    return bytes(data)
