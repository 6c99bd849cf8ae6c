"""The images a gallery is built from (``sct index``, ``sct embed``): a dataset split or a folder of images."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import catalog
from core.errors import UserFileNotFoundError, UserValueError
from retrieval.image_folder import list_image_folder
from retrieval.image_roots import check_indexable, folder_of

#: ``dataset`` in the manifest of a gallery built with --images
IMAGE_FOLDER = "image-folder"

Source = tuple[str, str, str | None]  # (path, label, chain)


def index_sources(
    *,
    dataset: str | None,
    data_root: str | None,
    split: str | None,
    images: str | None,
    files: str | None = None,
) -> tuple[list[Source], str, str, str]:
    """(path, label, chain) of every image to index, in order; the dataset name; the split; the resolved root
    folder (``data_root`` or ``images``) that every image was checked to lie in (retrieval.image_roots).

    ``dataset`` with ``data_root`` (and optionally ``split``, default the dataset's gallery split), or
    ``images``: a folder whose subfolder names are the labels; or ``files``: a list of image files
    (``read_file_list``).
    """
    if dataset:
        if not data_root:
            raise UserValueError("--dataset needs --data-root")
        split = split or catalog.spec(dataset).index_split
        records = catalog.read_dataset(dataset, data_root)
        print(catalog.summarize(records), file=sys.stderr)
        sources = [(r.path, r.label, r.chain) for r in catalog.select_split(records, split)]
        root = os.path.realpath(data_root)
    else:
        if data_root or split:
            raise UserValueError("--data-root and --split go with --dataset, not --images or --files")
        listed = read_file_list(files) if files else list_image_folder(images)
        sources = [(path, label, None) for path, label in listed]
        root = folder_of(path for path, _ in listed) if files else os.path.realpath(images)
        dataset, split = IMAGE_FOLDER, ""
    check_indexable([path for path, _, _ in sources], root)
    return sources, dataset, split, root


def read_file_list(list_file: str) -> list[tuple[str, str]]:
    """(absolute path, label) of each line of ``list_file``: "PATH" or "PATH<TAB>LABEL"; without a label, the
    name of the image's folder. Blank lines and lines starting with # are skipped."""
    try:
        lines = open(list_file, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        raise UserFileNotFoundError(f"file list not found: {list_file}") from None
    except UnicodeDecodeError as exc:
        raise UserValueError(f"{list_file} is not a UTF-8 text file of image paths: {exc}") from None
    listed = []
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        path = os.path.abspath(path.strip())
        listed.append((path, label.strip() if label else os.path.basename(os.path.dirname(path))))
    if not listed:
        raise UserValueError(f"{list_file} lists no image files (one path per line, optionally a tab and a label)")
    return listed


def report_unreadable(failures: Sequence[tuple[str, str]]) -> None:
    """List the images that were skipped as unreadable on stderr, then their count."""
    for path, reason in failures:
        print(f"skipped unreadable image {path}: {reason}", file=sys.stderr)
    if failures:
        print(f"skipped {len(failures):,} unreadable image(s)", file=sys.stderr)
