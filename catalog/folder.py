"""Generic folder dataset: ``root/<class>/**/<image>``, or an explicit ``root/split.csv``.

Without a split file the classes, sorted by name, are split the way the
metric-learning benchmarks split CUB and Cars: the first ``floor(n / 2)``
classes are "train" and the rest "test", so train and test share no class
(an odd class count puts the extra class in "test").

With ``root/split.csv`` (header ``path,label,split``, optional ``chain``; paths
relative to root) the file decides everything and no folder is scanned.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from catalog.records import SPLITS, DatasetError, ImageRecord

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_FILE = "split.csv"
_SPLIT_COLUMNS = ("path", "label", "split")
_MAX_LISTED = 5


def read_folder(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Read a folder dataset; record paths are absolute."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    if (root / SPLIT_FILE).is_file():
        return read_split_file(root / SPLIT_FILE)
    return _read_class_folders(root)


def read_split_file(split_file: str | os.PathLike[str]) -> list[ImageRecord]:
    """Read ``split.csv``: one row per image, paths relative to the file's folder."""
    split_file = Path(split_file).resolve()
    root = split_file.parent
    with split_file.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing_columns = [c for c in _SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise DatasetError(
                f"{split_file}: header must contain {','.join(_SPLIT_COLUMNS)} (optional chain); "
                f"missing {', '.join(missing_columns)}"
            )
        records = [_split_row(split_file, reader.line_num, row, root) for row in reader]
    if not records:
        raise DatasetError(f"{split_file}: no rows")
    missing_files = [r.path for r in records if not os.path.isfile(r.path)]
    if missing_files:
        raise DatasetError(
            f"{split_file}: {len(missing_files)} listed file(s) do not exist, e.g. "
            + ", ".join(missing_files[:_MAX_LISTED])
        )
    return records


def _split_row(split_file: Path, line: int, row: dict[str, str], root: Path) -> ImageRecord:
    where = f"{split_file}, line {line}"
    path, label, split = (row[c].strip() if row[c] else "" for c in _SPLIT_COLUMNS)
    if not path or not label:
        raise DatasetError(f"{where}: path and label must not be empty")
    if Path(path).is_absolute():
        raise DatasetError(f"{where}: path {path!r} must be relative to {root}")
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    chain = (row.get("chain") or "").strip() or None
    return ImageRecord(path=str(root / path), label=label, split=split, chain=chain)


def _read_class_folders(root: Path) -> list[ImageRecord]:
    class_dirs = subfolders(root)
    if not class_dirs:
        raise DatasetError(
            f"dataset root {root} has no class folders; expected {root}/<class>/<images> "
            f"or a {SPLIT_FILE} with columns {','.join(_SPLIT_COLUMNS)}"
        )
    images_per_class = {d.name: image_files(d) for d in class_dirs}
    classes = [name for name, files in images_per_class.items() if files]
    if not classes:
        raise DatasetError(
            f"no images found under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
            f"in {len(class_dirs)} class folder(s))"
        )
    n_train = len(classes) // 2
    return [
        ImageRecord(path=str(path), label=name, split="train" if i < n_train else "test")
        for i, name in enumerate(classes)
        for path in images_per_class[name]
    ]


def subfolders(directory: Path) -> list[Path]:
    """Folders directly in directory, sorted by name; hidden ones are skipped."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(directory: Path) -> list[Path]:
    """Image files anywhere below directory, sorted; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)
