"""Hostile requests for ``POST /api/search``, and what a correct answer to each looks like.

One generator serves the seeded CI fuzz test (tests/test_reliability_uploads.py,
through Flask's test client) and the long fuzz run against gunicorn over HTTP
(benchmarks/fuzz_search.py): ``hostile_request(rng, corpus, max_upload_bytes)``
draws one request from a ``random.Random``.

The corpus holds an image of every format Pillow can both write and read, in
every mode it accepts, plus the cases that break decoders: animations, CMYK,
16-bit, alpha and palettes, the eight EXIF orientations, headers that declare
huge sizes, extreme aspect ratios, and the inputs that crashed the decoder
before it was hardened. Requests then mutate those images (truncation, bit
flips, overwritten and inserted bytes) or break the request itself (missing
fields, wrong content types, broken multipart, many files or parts, oversized
bodies and fields, hostile filenames).
"""

from __future__ import annotations

import io
import json
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.photos import photo_corpus
from webapp import MAX_FORM_FIELD_BYTES

#: Formats that need an external program or handler to read (EPS: Ghostscript) or that Pillow only stubs.
_UNREADABLE_FORMATS = {"EPS", "BUFR", "GRIB", "HDF5", "WMF", "PDF"}
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F")
_BOUNDARY = "hostile-boundary-7d1f"

WEIRD_FILENAMES = (
    b"../../etc/passwd", b"/etc/passwd", b"..\\..\\windows\\win.ini", b"%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"a\x00b.png", b"\x00", b"", b"x" * 5000 + b".png", "画像.png".encode(), b"\xff\xfe\xfd.png",
    b"q.png\r\nX-Injected: 1", b'q".png', b"q.png; name=\"k\"", b"CON", b".", b"..",
)
WEIRD_FIELD_VALUES = (
    "", " ", "0", "-1", "1e3", "2.5", "9" * 5000, "\x00", "1\x002", "３", "٣", "null", "[]", "../colors",
    "colors\x00", "x" * 300, "%2e%2e",
)
PART_CONTENT_TYPES = (
    None, "image/png", "image/jpeg", "text/plain", "application/octet-stream", "application/json", "",
    "image/png; charset=../../x", "multipart/mixed; boundary=zz",
)


@dataclass(frozen=True)
class HostileRequest:
    """One request body with its Content-Type; ``image`` is the sole image part's bytes when the form is well-formed."""

    kind: str
    body: bytes
    content_type: str
    image: bytes | None = None
    k: str | None = None
    index: str | None = None


# --- the image corpus ----------------------------------------------------------------------------------------


def image_corpus(seed: int = 0, *, photos: bool = False) -> list[tuple[str, bytes]]:
    """(name, bytes) of every Pillow-writable format × mode that saves, and the special cases; with ``photos``,
    also the photos of realistic sizes (0.1 to 15 MB) of tests/photos.py, for fuzzing a server's real limits."""
    Image.init()
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    corpus = []
    formats = sorted((set(Image.SAVE) & set(Image.OPEN)) - _UNREADABLE_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in formats:
            for mode in _MODES:
                try:
                    image = Image.fromarray(pixels).convert(mode) if not mode.startswith("I;16") else _gradient16(mode)
                    corpus.append((f"{fmt}/{mode}", _encoded(image, fmt)))
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # this format cannot store this mode
    realistic = [(f"photo {photo.name}", photo.data) for photo in photo_corpus()] if photos else []
    return corpus + special_images(seed) + realistic


def special_images(seed: int = 0) -> list[tuple[str, bytes]]:
    """Images that break naive decoders, each valid or invalid on purpose."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (24, 16), color) for color in ("red", "green", "blue")]
    special = [
        ("zero-byte", b""),
        ("animated GIF", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)),
        ("animated PNG", _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)),
        ("animated WebP", _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)),
        ("multi-page TIFF", _encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
        ("CMYK JPEG", _encoded(rgb.convert("CMYK"), "JPEG")),
        ("16-bit PNG", _encoded(_gradient16("I;16"), "PNG")),
        ("LA PNG", _encoded(rgb.convert("LA"), "PNG")),
        ("RGBA PNG", _encoded(rgb.convert("RGBA"), "PNG")),
        ("P PNG with transparency", _encoded(rgb.convert("P"), "PNG", transparency=0)),
        ("progressive JPEG", _encoded(rgb, "JPEG", progressive=True)),
        ("PNG declaring 100000×100000 (decompression bomb)", png_header_only(100_000, 100_000)),
        ("PNG declaring 1000×1000 (over max_pixels)", png_header_only(1000, 1000)),
        ("PNG declaring 0×0", png_header_only(0, 0)),
        ("PNG declaring 2^31−1 × 2^31−1", png_header_only(2**31 - 1, 2**31 - 1)),
        ("GIF declaring 65535×65535", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00,"
         + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00\x08\x02\x44\x01\x00;"),
        ("BMP declaring 50000×50000", b"BM" + struct.pack("<IHHI", 1000, 0, 0, 54)
         + struct.pack("<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 0, 0, 0, 0) + b"\x00" * 16),
        ("PGM 200000×1 (extreme aspect ratio)", b"P5 200000 1 255\n" + bytes(200_000)),
        ("PNG 1×200000 (extreme aspect ratio)", _encoded(Image.new("L", (1, 200_000)), "PNG")),
        ("JPEG with corrupt EXIF", _corrupt_exif_jpeg(rgb)),
        *[(f"JPEG EXIF orientation {o}", _encoded(rgb, "JPEG", exif=_orientation(o))) for o in range(1, 9)],
        *[(f"PNG EXIF orientation {o}", _encoded(rgb, "PNG", exif=_orientation(o))) for o in (0, 3, 6, 9, 65535)],
    ]
    return special + fuzz_regressions()


def fuzz_regressions() -> list[tuple[str, bytes]]:
    """Single bit flips that made Pillow raise something other than OSError/ValueError (found by the fuzzer).

    Before catalog.images caught every exception of a decoder, each of these was an HTTP 500.
    """
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 17), dtype=np.uint8))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8))
    cases = [  # (name, image, format, byte position, bit)
        ("DDS unknown pixel format flags (NotImplementedError)", rgb, "DDS", 80, 6),
        ("BLP unknown compression (BLPFormatError)", rgb.convert("P"), "BLP", 4, 0),
        ("SPIDER header (AttributeError)", grey, "SPIDER", 107, 6),
        ("TIFF IFD rational (TypeError)", rgb, "TIFF", 72, 0),
        ("AVIF box (RuntimeError)", rgb, "AVIF", 81, 0),
    ]
    regressions = []
    for name, image, fmt, position, bit in cases:
        try:
            data = bytearray(_encoded(image, fmt))
        except (OSError, KeyError):
            continue  # this Pillow build cannot write the format
        data[position] ^= 1 << bit
        regressions.append((f"regression: {name}", bytes(data)))
    return regressions


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height and whose pixel data is garbage."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _gradient16(mode: str) -> Image.Image:
    values = np.linspace(0, 65535, 17 * 23).reshape(17, 23).astype("<u2" if mode == "I;16" else ">u2")
    return Image.frombytes(mode, (23, 17), values.tobytes())


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _corrupt_exif_jpeg(image: Image.Image) -> bytes:
    exif = _orientation(6)
    exif[0x010F] = "maker" * 20
    data = bytearray(_encoded(image, "JPEG", exif=exif))
    start = data.find(b"Exif\x00\x00")
    for offset in range(start + 10, start + 60, 7):  # scramble the IFD entries
        data[offset] ^= 0x5A
    return bytes(data)


# --- mutations and requests ----------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three random damages: truncation, bit flips, overwritten, inserted, duplicated or zeroed bytes."""
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(_MUTATIONS)(rng, bytearray(data))
    return bytes(data)


def _truncate(rng: random.Random, data: bytearray) -> bytes:
    return bytes(data[: rng.randrange(len(data) + 1)])


def _flip_bits(rng: random.Random, data: bytearray) -> bytes:
    for _ in range(rng.randint(1, 8) if data else 0):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _overwrite(rng: random.Random, data: bytearray) -> bytes:
    for _ in range(rng.randint(1, 4) if data else 0):
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return bytes(data)


def _insert(rng: random.Random, data: bytearray) -> bytes:
    at = rng.randrange(len(data) + 1)
    return bytes(data[:at]) + rng.randbytes(rng.randint(1, 64)) + bytes(data[at:])


def _duplicate(rng: random.Random, data: bytearray) -> bytes:
    if not data:
        return b""
    start = rng.randrange(len(data))
    piece = data[start : start + rng.randint(1, 256)]
    at = rng.randrange(len(data) + 1)
    return bytes(data[:at] + piece * rng.randint(1, 4) + data[at:])


def _zero_range(rng: random.Random, data: bytearray) -> bytes:
    if data:
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(1, 64))
        data[start:end] = bytes(end - start)
    return bytes(data)


_MUTATIONS: tuple[Callable[[random.Random, bytearray], bytes], ...] = (
    _truncate, _flip_bits, _overwrite, _insert, _duplicate, _zero_range,
)


def multipart(parts: list[tuple[str, bytes | None, str | None, bytes]], boundary: str = _BOUNDARY) -> bytes:
    """A multipart/form-data body of (field name, filename or None, part Content-Type or None, data), bytes as given."""
    chunks = []
    for name, filename, content_type, data in parts:
        disposition = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        header = disposition + b"\r\n"
        if content_type is not None:
            header += b"Content-Type: " + content_type.encode("utf-8", "surrogateescape") + b"\r\n"
        chunks.append(b"--" + boundary.encode() + b"\r\n" + header + b"\r\n" + data + b"\r\n")
    return b"".join(chunks) + b"--" + boundary.encode() + b"--\r\n"


def search_form(image: bytes, *, filename: bytes = b"query.png", content_type: str | None = "image/png",
                k: str | None = None, index: str | None = None) -> HostileRequest:
    """A well-formed search request (whatever the image bytes are)."""
    parts = [("image", filename, content_type, image)]
    parts += [(name, None, None, value.encode("utf-8", "surrogatepass"))
              for name, value in (("k", k), ("index", index)) if value is not None]
    return HostileRequest("form", multipart(parts), f"multipart/form-data; boundary={_BOUNDARY}", image, k, index)


def hostile_request(rng: random.Random, corpus: list[tuple[str, bytes]], max_upload_bytes: int,
                    index_names: tuple[str, ...] = ()) -> HostileRequest:
    """One request: a corpus image (kind "image"), a damaged one ("mutated"), random bytes ("random"), or a
    request whose structure is broken (kind "structure: ...")."""
    roll = rng.random()
    if roll < 0.70:
        name, data = rng.choice(corpus)
        kind = "image"
        if roll < 0.55:
            data, kind = mutate(rng, data), "mutated"
        request = search_form(data, filename=_filename(rng), content_type=rng.choice(PART_CONTENT_TYPES),
                              k=_field(rng, ("1", "3", "4", "8", None)), index=_field(rng, (None, *index_names)))
        return HostileRequest(f"{kind}: {name.split('/')[0]}", request.body, request.content_type, request.image,
                              request.k, request.index)
    if roll < 0.82:
        data = rng.randbytes(rng.choice((0, 1, 16, 512, 4096)))
        request = search_form(data, filename=_filename(rng))
        return HostileRequest("random bytes", request.body, request.content_type, data)
    return broken_structure(rng, rng.choice(corpus)[1], max_upload_bytes)


def broken_structure(rng: random.Random, image: bytes, max_upload_bytes: int, case: str | None = None
                     ) -> HostileRequest:
    """A request whose form, not its image, is wrong: ``case`` (one of STRUCTURE_CASES), else a random one."""
    multipart_type = f"multipart/form-data; boundary={_BOUNDARY}"
    case = case or rng.choice(STRUCTURE_CASES)
    if case == "no image field":
        body, content_type = multipart([("k", None, None, b"3")]), multipart_type
    elif case == "image as a text field":
        body, content_type = multipart([("image", None, None, image)]), multipart_type
    elif case == "wrong field name":
        body, content_type = multipart([("file", b"q.png", "image/png", image)]), multipart_type
    elif case == "JSON body":
        body, content_type = json.dumps({"image": image.hex()[:1000]}).encode(), "application/json"
    elif case == "urlencoded body":
        body, content_type = b"image=" + image[:200].hex().encode() + b"&k=3", "application/x-www-form-urlencoded"
    elif case == "raw image body":
        body, content_type = image, rng.choice(("image/png", "application/octet-stream", "text/plain"))
    elif case == "multipart without boundary":
        body, content_type = multipart([("image", b"q.png", "image/png", image)]), "multipart/form-data"
    elif case == "wrong boundary":
        body, content_type = multipart([("image", b"q.png", "image/png", image)]), "multipart/form-data; boundary=zz"
    elif case == "truncated multipart":
        body = multipart([("image", b"q.png", "image/png", image)])
        body, content_type = body[: rng.randrange(len(body))], multipart_type
    elif case == "garbage multipart":
        body, content_type = rng.randbytes(rng.randint(0, 2048)), multipart_type
    elif case == "two images":
        body = multipart([("image", b"a.png", "image/png", image), ("image", b"b.png", "image/png", image)])
        content_type = multipart_type
    elif case == "many images":
        body = multipart([("image", f"{i}.png".encode(), "image/png", image) for i in range(rng.randint(3, 40))])
        content_type = multipart_type
    elif case == "many parts":
        parts = [(f"f{i}", None, None, b"x") for i in range(rng.randint(17, 2000))]
        body, content_type = multipart([("image", b"q.png", "image/png", image), *parts]), multipart_type
    elif case == "huge text field":
        parts = [("image", b"q.png", "image/png", image), ("k", None, None, b"7" * rng.randint(MAX_FORM_FIELD_BYTES + 1, MAX_FORM_FIELD_BYTES + (32 << 10)))]
        body, content_type = multipart(parts), multipart_type
    elif case == "oversized body":
        padding = max_upload_bytes + rng.randint(1, 4096)
        body, content_type = multipart([("image", b"q.png", "image/png", image + bytes(padding))]), multipart_type
    else:
        raise AssertionError(case)
    return HostileRequest(f"structure: {case}", body, content_type)


STRUCTURE_CASES = (
    "no image field", "image as a text field", "wrong field name", "JSON body", "urlencoded body", "raw image body",
    "multipart without boundary", "wrong boundary", "truncated multipart", "garbage multipart", "two images",
    "many images", "many parts", "huge text field", "oversized body",
)


def _filename(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b"query.png"
    if rng.random() < 0.7:
        return rng.choice(WEIRD_FILENAMES)
    return rng.randbytes(rng.randint(0, 300))


def _field(rng: random.Random, usual: tuple[str | None, ...]) -> str | None:
    return rng.choice(usual) if rng.random() < 0.75 else rng.choice(WEIRD_FIELD_VALUES)


# --- what a correct answer looks like ------------------------------------------------------------------------


def check_answer(status: int, content_type: str, body: bytes) -> dict:
    """The JSON object of a search response; raise AssertionError unless it is a 2xx result or a 4xx error.

    A 4xx must carry ``{"error": "<a reason>"}``; a 200 must carry results with ids, labels and scores that
    never increase.
    """
    assert status < 500, f"HTTP {status}: {body[:500]!r}"
    assert content_type.startswith("application/json"), f"HTTP {status} answered {content_type}: {body[:200]!r}"
    answer = json.loads(body)
    assert isinstance(answer, dict), answer
    if status == 200:
        results = answer["results"]
        assert isinstance(results, list) and results, answer
        scores = [result["score"] for result in results]
        assert all(isinstance(result["id"], int) and result["id"] >= 0 for result in results), answer
        assert all(isinstance(result["label"], str) for result in results), answer
        assert all(a >= b - 1e-6 for a, b in zip(scores, scores[1:])), scores
    else:
        assert 400 <= status < 500, status
        assert isinstance(answer.get("error"), str) and len(answer["error"]) > 10, answer
    return answer
