"""Build many-class image sets whose test classes are never seen in training, from material on any Debian machine.

``glyphs``: about 150 characters (Latin, Greek, Cyrillic, digits, symbols; glyphs that look alike in a font are
merged away) drawn in the 37 faces of the DejaVu and Liberation fonts (Debian packages fonts-dejavu-core,
fonts-dejavu-extra and fonts-liberation), each with a random rotation, scale, shift, stroke and background
colour, blur and noise, at 64 px. A class is a character; half the classes (a seeded shuffle) train, the other
half are the gallery. Like Omniglot, it asks for an embedding of shapes it has never seen.

``emoji``: 200 emoji (a seeded choice among the single-codepoint ones in U+1F300–1F5FF, 1F600–1F64F,
1F680–1F6FF and 1F900–1F9FF that the Noto Color Emoji font of Debian package fonts-noto-color-emoji draws,
without renderings identical to another's), each drawn in colour once at 109 px and then, 60 times, scaled,
rotated, flipped, shifted and laid on a random solid or gradient background with clutter shapes behind, with
colour jitter, blur and noise, at 64 px. A class is an emoji; half the classes (seeded) train, the other half
are the gallery. Unlike glyphs it asks for colour and texture as well as shape.

``fashion-5-5``: Fashion-MNIST (Debian package dataset-fashion-mnist) split by class: T-shirt, trouser,
pullover, dress and coat train; sandal, shirt, sneaker, bag and ankle boot are the gallery.

Each set is a `--dataset folder` root: one folder per class plus split.csv (path,label,split), so
`sct train --dataset folder --data-root DIR` trains on its train classes and `sct index --dataset folder
--data-root DIR --split test` indexes the unseen ones. The same seed gives the same bytes.

    python -m benchmarks.zero_shot_sets glyphs --out data/glyphs
    python -m benchmarks.zero_shot_sets emoji --out data/emoji
    python -m benchmarks.zero_shot_sets fashion-5-5 --out data/fashion-5-5
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

FONT_FOLDERS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
#: Candidate characters; look-alikes (Latin O and Greek Omicron, l and I in sans faces, ...) are merged away.
CANDIDATES = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπρσφψω"
    "БГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯбвгджзилпфцчшщъыьэюя"
    "#$%&@?!§¶∑∫∂√∞≈≠±÷×←→↑↓♠♣♥♦★☆"
)
SIDE = 64
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
#: The only size at which FreeType loads the font's CBDT colour bitmaps.
EMOJI_SIZE = 109
#: Candidate code points (inclusive ranges): misc. symbols and pictographs, emoticons, transport and map,
#: supplemental symbols and pictographs.
EMOJI_RANGES = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF))
FASHION_TRAIN_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def font_files() -> list[Path]:
    """The usable TrueType faces (the math font has few of the glyphs)."""
    faces = sorted(
        path for folder in FONT_FOLDERS if folder.is_dir() for path in folder.glob("*.ttf") if "Math" not in path.name
    )
    if len(faces) < 10:
        raise SystemExit(
            "error: need the DejaVu and Liberation fonts: apt-get install fonts-dejavu-core "
            "fonts-dejavu-extra fonts-liberation"
        )
    return faces


def _mask(character: str, font: ImageFont.FreeTypeFont, side: int) -> np.ndarray | None:
    """The character's ink, cropped to its box and scaled to side × side; None when the font lacks it."""
    image = Image.new("L", (side * 2, side * 2))
    ImageDraw.Draw(image).text((side // 4, side // 4), character, fill=255, font=font)
    box = image.getbbox()
    if box is None:
        return None
    return np.asarray(image.crop(box).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255


def distinct_characters(faces: Sequence[Path]) -> list[str]:
    """CANDIDATES drawn by every face, without those that look like an earlier one in the regular sans face
    (cosine of their cropped, scaled ink ≥ 0.85)."""
    reference = ImageFont.truetype(str(next(f for f in faces if f.name == "DejaVuSans.ttf")), 40)
    fonts = [ImageFont.truetype(str(face), 40) for face in faces]
    kept: list[str] = []
    inks: list[np.ndarray] = []
    for character in dict.fromkeys(CANDIDATES):
        if any(font.getmask(character).getbbox() is None for font in fonts):
            continue
        ink = _mask(character, reference, 24)
        if ink is None:
            continue
        vector = ink.ravel() / (np.linalg.norm(ink) + 1e-6)
        if any(float(vector @ other) >= 0.85 for other in inks):
            continue
        kept.append(character)
        inks.append(vector)
    return kept


def draw_glyph(character: str, face: Path, rng: random.Random) -> Image.Image:
    """One image of ``character`` in ``face``: random size, rotation, shift, colours, blur and noise."""
    ink = tuple(rng.randrange(0, 110) for _ in range(3))
    paper = tuple(rng.randrange(150, 256) for _ in range(3))
    if rng.random() < 0.5:
        ink, paper = paper, ink
    canvas = SIDE * 2
    font = ImageFont.truetype(str(face), int(canvas * rng.uniform(0.45, 0.7)))
    glyph = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(glyph).text((canvas / 2, canvas / 2), character, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(
        rng.uniform(-20, 20),
        resample=Image.BILINEAR,
        translate=(rng.uniform(-0.1, 0.1) * canvas, rng.uniform(-0.1, 0.1) * canvas),
    )
    image = Image.composite(Image.new("RGB", glyph.size, ink), Image.new("RGB", glyph.size, paper), glyph)
    image = image.resize((SIDE, SIDE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 10), (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def build_glyphs(out: Path, *, per_class: int = 60, seed: int = 0) -> tuple[int, int]:
    """Write the glyph set; returns (classes, images)."""
    faces = font_files()
    characters = distinct_characters(faces)
    order = characters[:]
    random.Random(seed).shuffle(order)
    train = set(order[: len(order) // 2])
    rows = []
    for number, character in enumerate(characters):
        label = f"{number:03d}-U{ord(character):04X}"
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1_000_003 + ord(character))
        for index in range(per_class):
            path = folder / f"{index:02d}.png"
            draw_glyph(character, faces[(index + number) % len(faces)], rng).save(path, optimize=False)
            rows.append((path.relative_to(out).as_posix(), label, "train" if character in train else "test"))
    _write_split(out, rows)
    return len(characters), len(rows)


def emoji_font() -> ImageFont.FreeTypeFont:
    """Noto Color Emoji at the one size its colour bitmaps load."""
    if not EMOJI_FONT.is_file():
        raise SystemExit(f"error: {EMOJI_FONT} is missing: apt-get install fonts-noto-color-emoji")
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_SIZE)


def render_emoji(character: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """``character`` drawn in colour at the font's size, RGBA cropped to its ink; None when the font draws nothing."""
    left, top, right, bottom = font.getbbox(character)
    image = Image.new("RGBA", (max(1, right - min(0, left)), max(1, bottom - min(0, top))))
    ImageDraw.Draw(image).text((-min(0, left), -min(0, top)), character, font=font, embedded_color=True)
    box = image.getchannel("A").getbbox()
    return None if box is None else image.crop(box)


def distinct_emoji(font: ImageFont.FreeTypeFont) -> list[str]:
    """The candidates in EMOJI_RANGES that the font draws, in code-point order, without any whose rendering is
    identical to an earlier one's."""
    kept: list[str] = []
    seen: set[bytes] = set()
    for first, last in EMOJI_RANGES:
        for point in range(first, last + 1):
            sprite = render_emoji(chr(point), font)
            if sprite is None:
                continue
            key = hashlib.sha256(repr(sprite.size).encode() + sprite.tobytes()).digest()
            if key in seen:
                continue
            kept.append(chr(point))
            seen.add(key)
    return kept


def _background(rng: random.Random) -> Image.Image:
    """A random solid colour or two-colour linear gradient, with a few random rectangles and ellipses."""
    first = tuple(rng.randrange(256) for _ in range(3))
    if rng.random() < 0.5:
        image = Image.new("RGB", (SIDE, SIDE), first)
    else:
        second = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:SIDE, 0:SIDE]
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        pixels = np.array(first, dtype=np.float64) * (1 - ramp[..., None]) + second * ramp[..., None]
        image = Image.fromarray(np.round(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(4)):
        x, y = rng.uniform(-SIDE * 0.2, SIDE), rng.uniform(-SIDE * 0.2, SIDE)
        box = (x, y, x + rng.uniform(SIDE * 0.1, SIDE * 0.5), y + rng.uniform(SIDE * 0.1, SIDE * 0.5))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    return image


def draw_emoji(sprite: Image.Image, rng: random.Random) -> Image.Image:
    """One image of an emoji (``sprite``: its RGBA rendering): random size, flip, rotation, shift, background and
    clutter, colour jitter, blur and noise."""
    size = SIDE * rng.uniform(0.45, 0.9)
    factor = size / max(sprite.size)
    width, height = max(1, round(sprite.width * factor)), max(1, round(sprite.height * factor))
    emoji = sprite.resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        emoji = emoji.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    emoji = emoji.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC, expand=True)
    room = (SIDE - size) / 2
    centre_x, centre_y = SIDE / 2 + rng.uniform(-room, room), SIDE / 2 + rng.uniform(-room, room)
    image = _background(rng)
    image.paste(emoji, (round(centre_x - emoji.width / 2), round(centre_y - emoji.height / 2)), emoji)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 8), (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def build_emoji(out: Path, *, classes: int = 200, per_class: int = 60, seed: int = 0) -> tuple[int, int]:
    """Write the emoji set; returns (classes, images)."""
    font = emoji_font()
    pool = distinct_emoji(font)
    if not 2 <= classes <= len(pool):
        raise SystemExit(
            f"error: --classes must be 2 to {len(pool)} (the distinct emoji the font draws), " f"not {classes}"
        )
    chosen = random.Random(seed).sample(pool, classes)  # in random order: its first half trains
    train = set(chosen[: classes // 2])
    rows = []
    for character in sorted(chosen):
        label = f"u{ord(character):x}"
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        sprite = render_emoji(character, font)
        assert sprite is not None
        rng = random.Random(seed * 1_000_003 + ord(character))
        for index in range(per_class):
            path = folder / f"{index:02d}.png"
            draw_emoji(sprite, rng).save(path, optimize=False)
            rows.append((path.relative_to(out).as_posix(), label, "train" if character in train else "test"))
    _write_split(out, rows)
    return classes, len(rows)


def build_fashion_5_5(out: Path, source: Path = Path("/usr/share/datasets/fashion-mnist")) -> tuple[int, int]:
    """Write Fashion-MNIST's 70,000 images as a 5 / 5 class split; returns (classes, images)."""
    rows = []
    for part in ("train", "t10k"):
        images, labels = _idx(source / f"{part}-images-idx3-ubyte.gz"), _idx(source / f"{part}-labels-idx1-ubyte.gz")
        for index, (pixels, label) in enumerate(zip(images, labels)):
            name = FASHION_NAMES[int(label)]
            path = out / name / f"{part}-{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            rows.append((path.relative_to(out).as_posix(), name, "train" if name in FASHION_TRAIN_CLASSES else "test"))
    _write_split(out, rows)
    return len(FASHION_NAMES), len(rows)


def _idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(path, "rb") as file:
        data = file.read()
    dims = int(data[3])
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _write_split(out: Path, rows: list[tuple[str, str, str]]) -> None:
    with (out / "split.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot_sets",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n  python -m benchmarks.zero_shot_sets glyphs --out data/glyphs\n"
        "  python -m benchmarks.zero_shot_sets emoji --out data/emoji\n"
        "  python -m benchmarks.zero_shot_sets emoji --classes 50 --per-class 20 --seed 1 "
        "--out data/emoji-50\n"
        "  python -m benchmarks.zero_shot_sets fashion-5-5 --out data/fashion-5-5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("set", choices=("glyphs", "emoji", "fashion-5-5"))
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (a --dataset folder root)")
    parser.add_argument(
        "--seed", type=int, default=0, help="glyphs, emoji: drawing, class split and (emoji) class choice (default 0)"
    )
    parser.add_argument("--per-class", type=int, default=60, help="glyphs, emoji: images per class (default 60)")
    parser.add_argument("--classes", type=int, default=200, help="emoji: how many emoji (default 200)")
    args = parser.parse_args(argv)
    if args.set == "glyphs":
        classes, images = build_glyphs(args.out, per_class=args.per_class, seed=args.seed)
    elif args.set == "emoji":
        classes, images = build_emoji(args.out, classes=args.classes, per_class=args.per_class, seed=args.seed)
    else:
        classes, images = build_fashion_5_5(args.out)
    print(f"{args.set}: {classes} classes, {images:,} images in {args.out} (split.csv: half the classes train)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
