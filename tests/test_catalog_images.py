"""catalog.load_rgb / decode_rgb: every mode to the right RGB pixels, EXIF, and failures."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog import ImageLoadError, decode_rgb, load_rgb


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def _gray(values) -> np.ndarray:
    """Expected RGB array for a grey level per pixel."""
    values = np.asarray(values)
    return np.repeat(values[..., None], 3, axis=-1)


# --- modes -----------------------------------------------------------------------------------


def test_rgb_round_trip(tmp_path):
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    image = load_rgb(_save(Image.fromarray(array), tmp_path / "a.png"))
    np.testing.assert_array_equal(_pixels(image), array)


def test_mode_1_and_l(tmp_path):
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    np.testing.assert_array_equal(_pixels(load_rgb(_save(bits, tmp_path / "b.png"))), _gray([[0, 255]]))
    grey = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    np.testing.assert_array_equal(_pixels(load_rgb(_save(grey, tmp_path / "l.png"))), _gray([[0, 77, 255]]))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    # pixels: opaque black, fully transparent black, half-transparent black
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 3] = [255, 0, 128]
    image = Image.fromarray(rgba).convert(mode)
    got = _pixels(load_rgb(_save(image, tmp_path / "alpha.png")))
    expected = _gray([[0, 255, 127]])
    assert np.abs(got - expected).max() <= 1


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1  # blue is transparent
    got = _pixels(load_rgb(_save(image, tmp_path / "p.png", transparency=1)))
    np.testing.assert_array_equal(got, [[[255, 0, 0], [255, 255, 255]]])


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (1, 1))
    image.putpalette([10, 200, 30] + [0] * 765)
    np.testing.assert_array_equal(_pixels(load_rgb(_save(image, tmp_path / "p.bmp"))), [[[10, 200, 30]]])


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # black
    got = _pixels(load_rgb(_save(cmyk, tmp_path / "c.tif")))
    np.testing.assert_array_equal(got, [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])


def test_16_bit_is_scaled_by_65535(tmp_path):
    image = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert image.mode == "I;16"
    loaded = load_rgb(_save(image, tmp_path / "16.png"))
    np.testing.assert_array_equal(_pixels(loaded), _gray([[0, 128, 255]]))


def test_32_bit_int_in_16_bit_range_and_beyond(tmp_path):
    image = Image.fromarray(np.array([[0, 32896, 65535]], np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(_pixels(load_rgb(_save(image, tmp_path / "i.tif"))), _gray([[0, 128, 255]]))
    wide = Image.fromarray(np.array([[-100, 0, 155]], np.int32))  # outside 0..65535: stretched
    np.testing.assert_array_equal(_pixels(load_rgb(_save(wide, tmp_path / "w.tif"))), _gray([[0, 100, 255]]))


def test_float_in_unit_range_and_beyond(tmp_path):
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(_pixels(load_rgb(_save(image, tmp_path / "f.tif"))), _gray([[0, 128, 255]]))
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(_pixels(load_rgb(_save(wide, tmp_path / "w.tif"))), _gray([[0, 128, 255]]))


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (2, 2), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    got = _pixels(load_rgb(tmp_path / "anim.gif"))
    np.testing.assert_array_equal(got, np.full((2, 2, 3), [255, 0, 0]))


# --- EXIF orientation ------------------------------------------------------------------------


def _marked_image() -> Image.Image:
    """3 wide × 2 high, black, with a white top-left pixel."""
    image = Image.new("RGB", (3, 2))
    image.putpixel((0, 0), (255, 255, 255))
    return image


@pytest.mark.parametrize(
    ("orientation", "white_at"),
    [
        (1, (0, 0)),  # as stored
        (6, (1, 0)),  # rotate 90° clockwise to display: top-left goes to top-right
        (8, (0, 2)),  # rotate 90° counter-clockwise: top-left goes to bottom-left
    ],
)
def test_exif_orientation(tmp_path, orientation, white_at):
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_rgb(_save(_marked_image(), tmp_path / "o.png", exif=exif))
    expected_size = (3, 2) if orientation == 1 else (2, 3)
    assert loaded.size == expected_size
    pixels = _pixels(loaded)
    x, y = white_at
    assert pixels[y, x].tolist() == [255, 255, 255]
    assert pixels.sum() == 3 * 255  # exactly one white pixel


def test_exif_orientation_on_jpeg(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 10))  # white top-left quarter
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_rgb(_save(image, tmp_path / "o.jpg", exif=exif, quality=95))
    assert loaded.size == (20, 40)
    pixels = _pixels(loaded)
    assert pixels[5, 15].min() > 200 and pixels[5, 5].max() < 50  # white is now top-right


def test_decode_rgb_applies_exif_too():
    exif = Image.Exif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    _marked_image().save(buffer, format="PNG", exif=exif)
    pixels = _pixels(decode_rgb(buffer.getvalue()))
    assert pixels.shape == (3, 2, 3) and pixels[2, 0].tolist() == [255, 255, 255]


# --- failures --------------------------------------------------------------------------------


def _png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height but whose pixel data is garbage."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def _assert_fails(path: Path, reason_part: str) -> None:
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert reason_part in info.value.reason
    assert str(path) in str(info.value) and info.value.reason in str(info.value)


def test_missing_file(tmp_path):
    _assert_fails(tmp_path / "nope.png", "not found")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_fails(tmp_path / "empty.png", "empty")


def test_text_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello, not an image\n")
    _assert_fails(tmp_path / "notes.jpg", "not a recognised image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _assert_fails(path, "truncated or corrupt")


def test_directory(tmp_path):
    _assert_fails(tmp_path, "directory")


def test_decompression_bomb_file_rejected_from_header(tmp_path):
    # 50000 × 50000 is over twice Pillow's MAX_IMAGE_PIXELS; the data is garbage,
    # so a decode attempt would report corrupt data instead.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(50_000, 50_000))
    _assert_fails(path, "decompression bomb")


def test_decode_rgb_ok():
    data = _png_bytes((5, 4))
    np.testing.assert_array_equal(_pixels(decode_rgb(data)), np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize(
    ("data", "reason_part"),
    [
        (b"", "empty upload"),
        (b"%PDF-1.4 definitely not an image", "not a recognised image"),
        (_png_bytes((64, 64))[:200], "truncated or corrupt"),
    ],
)
def test_decode_rgb_bad_data(data, reason_part):
    with pytest.raises(ImageLoadError) as info:
        decode_rgb(data)
    assert reason_part in info.value.reason


def test_decode_rgb_rejects_too_many_pixels_before_decoding():
    with pytest.raises(ImageLoadError) as info:
        decode_rgb(_png_header_only(5000, 5000), max_pixels=1_000_000)  # garbage data: never decoded
    assert "too large" in info.value.reason and "5000×5000" in info.value.reason
    with pytest.raises(ImageLoadError, match="too large"):
        decode_rgb(_png_bytes((20, 10)), max_pixels=199)
    assert decode_rgb(_png_bytes((20, 10)), max_pixels=200).size == (20, 10)


def test_decode_rgb_pillow_bomb_limit_still_applies():
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        decode_rgb(_png_header_only(50_000, 50_000), max_pixels=10**12)


# --- decoding only what the model needs (min_side) ------------------------------------------------------------


def _jpeg(width: int, height: int, **params) -> bytes:
    rng = np.random.default_rng(width)
    coarse = rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_by_draft_to_no_less_than_min_side():
    data = _jpeg(4000, 3000)
    image = decode_rgb(data, min_side=300)
    assert min(image.size) >= 300 and image.size[0] * image.size[1] < 4000 * 3000 / 16
    full = np.asarray(decode_rgb(data).resize(image.size, Image.BOX)).astype(int)
    assert np.abs(np.asarray(image).astype(int) - full).mean() < 3  # the same picture, at lower resolution


def test_max_pixels_applies_to_what_is_decoded():
    data = _jpeg(4000, 3000)  # 12 megapixels, 1.5 after draft at 1/2 for a shorter side of 1000
    with pytest.raises(ImageLoadError, match="exceeds the limit of 10,000,000"):
        decode_rgb(data, max_pixels=10_000_000)
    assert decode_rgb(data, max_pixels=10_000_000, min_side=1000).size == (2000, 1500)


def test_a_16_bit_image_is_reduced_like_the_block_mean_of_its_8_bit_levels():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 65536, (240, 360), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    image = decode_rgb(buffer.getvalue(), min_side=40)  # factor 6: 240 // 40
    assert image.size == (60, 40)
    blocks = values.astype(np.float64).reshape(40, 6, 60, 6).mean(axis=(1, 3))
    expected = np.rint(blocks / 257)
    assert np.abs(np.asarray(image)[..., 0] - expected).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_the_reduced_image(orientation):
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    image = decode_rgb(buffer.getvalue(), min_side=30)  # factor 4
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        expected = ImageOps.exif_transpose(opened.convert("RGB")).reduce(4)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_palette_and_bilevel_images_are_reduced_after_conversion():
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    for image in (rgb.convert("P"), rgb.convert("1")):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        reduced = decode_rgb(buffer.getvalue(), min_side=16)
        assert reduced.size == (24, 16) and reduced.mode == "RGB"
        expected = image.convert("RGB").reduce(4)
        np.testing.assert_array_equal(np.asarray(reduced), np.asarray(expected))
