"""Fashion-MNIST: read the idx files and materialise them once as PNG files.

The idx files are looked for in the data root, ``<root>/raw``,
``<root>/FashionMNIST/raw`` (torchvision's layout) and the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Only when
none has them is torchvision asked to download them.

Images are written to ``<root>/images/<split>/<ClassName>/<index:05d>.png``
(index within the split) so that every later stage, and the web app, deals in
image files like any other dataset.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from catalog.records import DatasetError, ImageRecord

CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
#: split -> (images file, labels file), without the optional ".gz"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES_DIR = "images"
MARKER_FILE = ".complete.json"

# idx type code -> numpy dtype (big-endian), from the format's definition
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_fashion_mnist(root: str | os.PathLike[str]) -> list[ImageRecord]:
    """Records for the 60,000 train and 10,000 test images; writes the PNGs on first use."""
    root = Path(root).resolve()
    images_dir = root / IMAGES_DIR
    arrays = load_arrays(root)
    counts = {split: len(labels) for split, (_, labels) in arrays.items()}
    if not _is_complete(images_dir, counts):
        _materialise(arrays, images_dir)
    return [
        ImageRecord(path=_png_path(images_dir, split, index, label), label=CLASS_NAMES[label], split=split)
        for split, (_, labels) in arrays.items()
        for index, label in enumerate(labels.tolist())
    ]


def load_arrays(root: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 images [N, 28, 28], int64 labels [N]) for "train" and "test"."""
    root = Path(root)
    idx_dir = find_idx_dir(root) or _download_with_torchvision(root)
    arrays = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images = read_idx(_idx_file(idx_dir, images_name))
        labels = read_idx(_idx_file(idx_dir, labels_name)).astype(np.int64)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (len(images),):
            raise DatasetError(
                f"{idx_dir}: {split} idx files do not match: images {images.dtype}{list(images.shape)}, "
                f"labels {list(labels.shape)}"
            )
        if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASS_NAMES):
            raise DatasetError(f"{idx_dir}: {split} labels outside 0..{len(CLASS_NAMES) - 1}")
        arrays[split] = (images, labels)
    return arrays


def find_idx_dir(root: Path) -> Path | None:
    """The first candidate folder holding all four idx files (raw or .gz), or None."""
    for candidate in (root, root / "raw", root / "FashionMNIST" / "raw", SYSTEM_DIR):
        if all(_idx_file(candidate, name) for names in IDX_FILES.values() for name in names):
            return candidate
    return None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an idx file (gzip-compressed when its name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated idx header")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{path}: {len(data)} bytes, expected {expected} for shape {list(shape)}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_with_torchvision(root: Path) -> Path:
    """Last resort: let torchvision download the idx files into ``<root>/FashionMNIST/raw``."""
    help_text = (
        f"Fashion-MNIST idx files not found in {root}, {root / 'raw'} or {SYSTEM_DIR}. "
        f"Install them with `apt-get install dataset-fashion-mnist`, or put "
        f"{', '.join(n + '[.gz]' for names in IDX_FILES.values() for n in names)} in {root}"
    )
    try:
        from torchvision.datasets import FashionMNIST  # lazy: catalog never needs torch otherwise
    except ImportError:
        raise DatasetError(help_text) from None
    try:
        FashionMNIST(str(root), download=True)
    except Exception as exc:  # no network, proxy, checksum, ...: all mean the same to the user
        raise DatasetError(f"{help_text} (download with torchvision failed: {exc})") from exc
    idx_dir = find_idx_dir(root)
    if idx_dir is None:
        raise DatasetError(help_text)
    return idx_dir


def _png_path(images_dir: Path, split: str, index: int, label: int) -> str:
    # string formatting rather than Path joins: this runs 70,000 times per read
    return f"{images_dir}{os.sep}{split}{os.sep}{CLASS_NAMES[label]}{os.sep}{index:05d}.png"


def _is_complete(images_dir: Path, counts: dict[str, int]) -> bool:
    try:
        marker = json.loads((images_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"counts": counts, "classes": list(CLASS_NAMES)}


def _materialise(arrays: dict[str, tuple[np.ndarray, np.ndarray]], images_dir: Path) -> None:
    """Write every PNG into a temporary sibling folder, then rename it into place.

    The marker file is written last inside the temporary folder, so a folder
    named ``images`` with a matching marker is always complete.
    """
    counts = {split: len(labels) for split, (_, labels) in arrays.items()}
    images_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = images_dir.with_name(f".{images_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for split in arrays:
        for name in CLASS_NAMES:
            (tmp_dir / split / name).mkdir(parents=True)
    with tqdm(total=sum(counts.values()), desc="Fashion-MNIST → PNG", unit="img") as progress:
        for split, (images, labels) in arrays.items():
            for index, (pixels, label) in enumerate(zip(images, labels.tolist())):
                Path(_png_path(tmp_dir, split, index, label)).write_bytes(_encode_png(pixels))
                progress.update()
    (tmp_dir / MARKER_FILE).write_text(json.dumps({"counts": counts, "classes": list(CLASS_NAMES)}))
    _replace_dir(tmp_dir, images_dir, counts)


def _encode_png(pixels: np.ndarray) -> bytes:
    # Encoding in memory and writing once is ~1.6x faster than Image.save(path);
    # threads do not help (the encoder holds the GIL for such small images).
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _replace_dir(new_dir: Path, target: Path, counts: dict[str, int]) -> None:
    """Rename new_dir to target, moving aside an incomplete target first.

    When another process finished first (target complete), our copy is dropped.
    """
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
    if target.exists():
        if _is_complete(target, counts):
            shutil.rmtree(new_dir)
            return
        target.rename(stale)
    try:
        new_dir.rename(target)
    except OSError:
        if not _is_complete(target, counts):
            raise
        shutil.rmtree(new_dir)
    shutil.rmtree(stale, ignore_errors=True)
