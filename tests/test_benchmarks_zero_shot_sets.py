"""benchmarks/zero_shot_sets.py: the glyph set has 100+ classes, train and test classes are disjoint, and the
same seed gives the same bytes."""

from __future__ import annotations

import csv
import hashlib
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


@pytest.mark.skipif(not all(folder.is_dir() for folder in zero_shot_sets.FONT_FOLDERS),
                    reason="no DejaVu/Liberation fonts (apt-get install fonts-dejavu-core fonts-dejavu-extra "
                           "fonts-liberation)")
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
