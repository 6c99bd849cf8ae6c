"""catalog.inshop on a miniature In-shop Clothes Retrieval benchmark (same partition file, 2×2 images)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from catalog import DatasetError, ImageRecord, read_dataset

ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
    ("img/MEN/Denim/id_00000080/01_3_back.jpg", "id_00000080", "gallery"),
]


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path)


def _partition_text(rows, count: int | None = None) -> str:
    # the real file pads the columns with spaces
    lines = [f"{count if count is not None else len(rows)}", "image_name item_id evaluation_status"]
    lines += [f"{name:<60}{item:<20}{status}" for name, item, status in rows]
    return "\n".join(lines) + "\n"


def _make_inshop(root: Path, *, official: bool = False) -> Path:
    """The flat layout, or the official download's Eval/ and Img/ folders."""
    partition_dir, image_base = (root / "Eval", root / "Img") if official else (root, root)
    partition_dir.mkdir(parents=True, exist_ok=True)
    (partition_dir / "list_eval_partition.txt").write_text(_partition_text(ROWS))
    for name, _, _ in ROWS:
        _image(image_base / name)
    return root


@pytest.mark.parametrize("official", [False, True])
def test_records(tmp_path, official):
    root = _make_inshop(tmp_path / "inshop", official=official)
    records = read_dataset("inshop", root)
    image_base = root.resolve() / ("Img" if official else "")
    assert records[2] == ImageRecord(
        str(image_base / "img/MEN/Denim/id_00000080/01_1_front.jpg"), "id_00000080", "query", group="MEN/Denim"
    )
    assert [(r.label, r.split) for r in records] == [(item, split) for _, item, split in ROWS]
    assert [r.group for r in records] == ["WOMEN/Dresses"] * 2 + ["MEN/Denim"] * 3
    assert all(Path(r.path).is_file() and r.chain is None for r in records)


def test_missing_partition_file(tmp_path):
    root = _make_inshop(tmp_path / "inshop")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt not found in .* or .*Eval") as info:
        read_dataset("inshop", root)
    assert "img/WOMEN/Dresses/id_00000002/02_1_front.jpg" in str(info.value)  # the expected layout


def test_missing_image_folder(tmp_path):
    root = _make_inshop(tmp_path / "inshop")
    shutil.rmtree(root / "img")
    with pytest.raises(DatasetError, match="list_eval_partition.txt exist .* image folder seems to be missing"):
        read_dataset("inshop", root)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_partition_text(ROWS, count=6), "lists 5 images but its first line says 6"),
        (_partition_text([("img/a/b/c/d.jpg", "id_1", "test")]), "line 3: evaluation_status 'test' is not one of"),
        ("image_name item_id evaluation_status\n", "should start with the image count, then the header"),
    ],
)
def test_bad_partition_file(tmp_path, text, message):
    root = _make_inshop(tmp_path / "inshop")
    (root / "list_eval_partition.txt").write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_dataset("inshop", root)
