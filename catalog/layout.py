"""What the benchmark readers share: locating the dataset folder, reading index files, layout errors.

Every error names the missing or bad file and shows the layout that was
expected, because a dataset unpacked one folder too deep (or not at all) is the
usual cause.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

from catalog.records import DatasetError, ImageRecord

#: How many listed images are looked for on disk at read time (see require_images).
PROBED_IMAGES = 5


def layout_error(dataset: str, problem: str, tree: str) -> DatasetError:
    """A DatasetError saying what is wrong, followed by the expected layout."""
    return DatasetError(f"{dataset}: {problem}\nExpected layout:\n{textwrap.indent(tree.strip(), '  ')}")


def dataset_dir(root: str | os.PathLike[str], marker: str, subfolders: Sequence[str], dataset: str, tree: str) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of ``root/<subfolder>`` (absolute)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise layout_error(dataset, f"dataset root {root} does not exist or is not a directory", tree)
    candidates = [root, *(root / name for name in subfolders)]
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    raise layout_error(dataset, f"{marker} not found in {' or '.join(map(str, candidates))}", tree)


def require_file(path: Path, dataset: str, tree: str) -> Path:
    if not path.is_file():
        raise layout_error(dataset, f"missing {path.name} (looked for {path})", tree)
    return path


def read_rows(path: Path, columns: Sequence[str], *, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line after the first ``skip`` lines.

    Fields are separated by white space; the last column takes the rest of the
    line, so it may contain spaces.
    """
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.strip()
            if number <= skip or not line:
                continue
            fields = line.split(maxsplit=len(columns) - 1)
            if len(fields) != len(columns):
                raise DatasetError(
                    f"{path}, line {number}: expected {len(columns)} fields ({' '.join(columns)}), "
                    f"got {len(fields)}: {line!r}"
                )
            yield number, fields


def parse_int(text: str, path: Path, line: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{path}, line {line}: {what} {text!r} is not an integer") from None


def require_images(records: Sequence[ImageRecord], dataset: str, listed_in: str, tree: str) -> None:
    """Raise unless some of the first few records' files exist.

    Single missing images are the loader's business (it reports and skips
    them); none at all means the image folder is missing or in the wrong place.
    """
    if not records:
        raise layout_error(dataset, f"{listed_in} lists no images", tree)
    probed = records[:PROBED_IMAGES]
    if not any(os.path.isfile(record.path) for record in probed):
        raise layout_error(
            dataset,
            f"none of the first {len(probed)} images listed in {listed_in} exist (e.g. {probed[0].path}); "
            "the image folder seems to be missing or misplaced",
            tree,
        )
