"""Build many-class image sets whose test classes are never seen in training, from material on any Debian machine.

``glyphs``: about 150 characters (Latin, Greek, Cyrillic, digits, symbols; glyphs that look alike in a font are
merged away) drawn in the 37 faces of the DejaVu and Liberation fonts (Debian packages fonts-dejavu-core,
fonts-dejavu-extra and fonts-liberation), each with a random rotation, scale, shift, stroke and background
colour, blur and noise, at 64 px. A class is a character; half the classes (a seeded shuffle) train, the other
half are the gallery. Like Omniglot, it asks for an embedding of shapes it has never seen.

``fashion-5-5``: Fashion-MNIST (Debian package dataset-fashion-mnist) split by class: T-shirt, trouser,
pullover, dress and coat train; sandal, shirt, sneaker, bag and ankle boot are the gallery.

Each set is a `--dataset folder` root: one folder per class plus split.csv (path,label,split), so
`sct train --dataset folder --data-root DIR` trains on its train classes and `sct index --dataset folder
--data-root DIR --split test` indexes the unseen ones. The same seed gives the same bytes.

    python benchmarks/zero_shot_sets.py glyphs --out data/glyphs
    python benchmarks/zero_shot_sets.py fashion-5-5 --out data/fashion-5-5
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_FOLDERS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
#: Candidate characters; look-alikes (Latin O and Greek Omicron, l and I in sans faces, ...) are merged away.
CANDIDATES = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθλμξπρσφψω"
    "БГДЖЗИЙЛПФЦЧШЩЪЫЬЭЮЯбвгджзилпфцчшщъыьэюя"
    "#$%&@?!§¶∑∫∂√∞≈≠±÷×←→↑↓♠♣♥♦★☆"
)
SIDE = 64
FASHION_TRAIN_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def font_files() -> list[Path]:
    """The usable TrueType faces (the math font has few of the glyphs)."""
    faces = sorted(path for folder in FONT_FOLDERS if folder.is_dir() for path in folder.glob("*.ttf")
                   if "Math" not in path.name)
    if len(faces) < 10:
        raise SystemExit("error: need the DejaVu and Liberation fonts: apt-get install fonts-dejavu-core "
                         "fonts-dejavu-extra fonts-liberation")
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
    glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR,
                         translate=(rng.uniform(-0.1, 0.1) * canvas, rng.uniform(-0.1, 0.1) * canvas))
    image = Image.composite(Image.new("RGB", glyph.size, ink), Image.new("RGB", glyph.size, paper), glyph)
    image = image.resize((SIDE, SIDE), Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 10), (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def build_glyphs(out: Path, *, per_class: int = 24, seed: int = 0) -> tuple[int, int]:
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
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _write_split(out: Path, rows: list[tuple[str, str, str]]) -> None:
    with (out / "split.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Examples:\n  python benchmarks/zero_shot_sets.py glyphs --out data/glyphs\n"
                                            "  python benchmarks/zero_shot_sets.py fashion-5-5 --out data/fashion-5-5",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=("glyphs", "fashion-5-5"))
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (a --dataset folder root)")
    parser.add_argument("--seed", type=int, default=0, help="glyphs: drawing and class split (default 0)")
    parser.add_argument("--per-class", type=int, default=24, help="glyphs: images per class (default 24)")
    args = parser.parse_args(argv)
    if args.set == "glyphs":
        classes, images = build_glyphs(args.out, per_class=args.per_class, seed=args.seed)
    else:
        classes, images = build_fashion_5_5(args.out)
    print(f"{args.set}: {classes} classes, {images:,} images in {args.out} (split.csv: half the classes train)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
