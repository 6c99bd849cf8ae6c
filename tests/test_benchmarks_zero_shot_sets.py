"""benchmarks/zero_shot_sets.py: the glyph set has 100+ classes, train and test classes are disjoint, and the
same seed gives the same bytes; the emoji set's split.csv matches its files, its halves are disjoint, its classes
render distinctly, and it is reproducible."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import zero_shot_sets


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "split.csv").open(encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.skipif(
    not all(folder.is_dir() for folder in zero_shot_sets.FONT_FOLDERS),
    reason="no DejaVu/Liberation fonts (apt-get install fonts-dejavu-core fonts-dejavu-extra " "fonts-liberation)",
)
def test_glyphs_are_many_disjoint_classes_and_reproducible(tmp_path):
    classes, images = zero_shot_sets.build_glyphs(tmp_path / "a", per_class=2, seed=0)
    assert classes >= 100 and images == 2 * classes
    rows = _rows(tmp_path / "a")
    train = {row["label"] for row in rows if row["split"] == "train"}
    test = {row["label"] for row in rows if row["split"] == "test"}
    assert not train & test and len(train) + len(test) == classes and abs(len(train) - len(test)) <= 1
    for row in rows[:: max(1, len(rows) // 20)]:
        with Image.open(tmp_path / "a" / row["path"]) as image:
            assert image.size == (zero_shot_sets.SIDE, zero_shot_sets.SIDE) and image.mode == "RGB"
    zero_shot_sets.build_glyphs(tmp_path / "b", per_class=2, seed=0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    zero_shot_sets.build_glyphs(tmp_path / "c", per_class=2, seed=1)
    assert _rows(tmp_path / "c") != rows  # another seed splits and draws otherwise


needs_emoji_font = pytest.mark.skipif(
    not zero_shot_sets.EMOJI_FONT.is_file(), reason="no Noto Color Emoji font (apt-get install fonts-noto-color-emoji)"
)


@pytest.fixture(scope="module")
def emoji_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emoji") / "a"
    assert zero_shot_sets.build_emoji(root, classes=12, per_class=3, seed=0) == (12, 36)
    return root


@needs_emoji_font
def test_emoji_split_lists_exactly_the_files_in_disjoint_halves(emoji_root):
    rows = _rows(emoji_root)
    assert sorted(row["path"] for row in rows) == sorted(
        p.relative_to(emoji_root).as_posix() for p in emoji_root.rglob("*.png")
    )
    assert all(row["path"].split("/")[0] == row["label"] for row in rows)
    labels = {row["label"] for row in rows}
    assert len(labels) == 12 and all(sum(row["label"] == label for row in rows) == 3 for label in labels)
    for label in labels:  # filesystem-safe names of code points in the emoji ranges
        assert label.startswith("u") and label == label.lower()
        assert any(first <= int(label[1:], 16) <= last for first, last in zero_shot_sets.EMOJI_RANGES)
    train = {row["label"] for row in rows if row["split"] == "train"}
    test = {row["label"] for row in rows if row["split"] == "test"}
    assert {row["split"] for row in rows} == {"train", "test"}
    assert not train & test and len(train) == len(test) == 6
    for row in rows:
        with Image.open(emoji_root / row["path"]) as image:
            assert image.size == (zero_shot_sets.SIDE, zero_shot_sets.SIDE) and image.mode == "RGB"


@needs_emoji_font
def test_emoji_same_seed_same_bytes_other_seed_differs(emoji_root, tmp_path):
    zero_shot_sets.build_emoji(tmp_path / "b", classes=12, per_class=3, seed=0)
    assert _digest(tmp_path / "b") == _digest(emoji_root)
    assert (tmp_path / "b" / "split.csv").read_bytes() == (emoji_root / "split.csv").read_bytes()
    zero_shot_sets.build_emoji(tmp_path / "c", classes=12, per_class=3, seed=1)
    assert _digest(tmp_path / "c") != _digest(emoji_root)
    assert _rows(tmp_path / "c") != _rows(emoji_root)  # another seed chooses, splits and draws otherwise


@needs_emoji_font
def test_emoji_classes_have_distinct_nonblank_renderings(emoji_root):
    font = zero_shot_sets.emoji_font()
    sprites = {}
    for label in {row["label"] for row in _rows(emoji_root)}:
        sprite = zero_shot_sets.render_emoji(chr(int(label[1:], 16)), font)
        assert sprite is not None and sprite.mode == "RGBA", label
        sprites[label] = (sprite.size, sprite.tobytes())
    for (one, a), (two, b) in itertools.combinations(sprites.items(), 2):
        assert a != b, (one, two)
    assert zero_shot_sets.render_emoji("\U0010fffd", font) is None  # a code point the font lacks draws nothing
    pool = zero_shot_sets.distinct_emoji(font)
    assert len(pool) >= 200
    renderings = set()
    for character in pool:
        sprite = zero_shot_sets.render_emoji(character, font)
        assert sprite.getchannel("A").getbbox() == (0, 0, *sprite.size), hex(ord(character))  # ink, cropped
        renderings.add((sprite.size, sprite.tobytes()))
    assert len(renderings) == len(pool)


def test_distinct_emoji_drops_blank_and_identical_renderings(monkeypatch):
    red, blue = Image.new("RGBA", (4, 4), (255, 0, 0, 255)), Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    fake = {0x1F600: red, 0x1F601: None, 0x1F602: red.copy(), 0x1F603: blue, 0x1F604: blue.resize((4, 5))}
    monkeypatch.setattr(zero_shot_sets, "render_emoji", lambda character, font: fake.get(ord(character)))
    assert zero_shot_sets.distinct_emoji(None) == [chr(0x1F600), chr(0x1F603), chr(0x1F604)]


def test_emoji_errors_name_the_font_package_and_the_class_range(monkeypatch, tmp_path):
    if zero_shot_sets.EMOJI_FONT.is_file():
        with pytest.raises(SystemExit, match="--classes must be 2 to"):
            zero_shot_sets.build_emoji(tmp_path / "one", classes=1, per_class=1)
        assert not (tmp_path / "one" / "split.csv").exists()
    monkeypatch.setattr(zero_shot_sets, "EMOJI_FONT", tmp_path / "missing.ttf")
    with pytest.raises(SystemExit, match=r"^error: .*missing\.ttf.*apt-get install fonts-noto-color-emoji"):
        zero_shot_sets.build_emoji(tmp_path / "out", classes=4, per_class=1)


def test_the_command_line_passes_its_settings_to_the_builders(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(zero_shot_sets, "build_glyphs", lambda out, **kw: calls.append(("glyphs", kw)) or (2, 4))
    monkeypatch.setattr(zero_shot_sets, "build_emoji", lambda out, **kw: calls.append(("emoji", kw)) or (2, 4))
    assert zero_shot_sets.main(["glyphs", "--out", str(tmp_path)]) == 0
    assert zero_shot_sets.main(["emoji", "--out", str(tmp_path)]) == 0
    assert (
        zero_shot_sets.main(["emoji", "--out", str(tmp_path), "--classes", "12", "--per-class", "3", "--seed", "7"])
        == 0
    )
    assert calls == [
        ("glyphs", {"per_class": 60, "seed": 0}),
        ("emoji", {"classes": 200, "per_class": 60, "seed": 0}),
        ("emoji", {"classes": 12, "per_class": 3, "seed": 7}),
    ]
    assert capsys.readouterr().out.splitlines()[-1].startswith("emoji: 2 classes, 4 images in ")
