"""catalog.fashion_mnist on tiny idx files written here (gzip and raw); no network."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from catalog import DatasetError, load_rgb, read_dataset
from catalog import fashion_mnist as fm

REAL_DOWNLOAD = fm._download_with_torchvision


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _write_dataset(directory: Path, compress: bool, n_train: int = 6, n_test: int = 4) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28)), (np.arange(n_test) * 3) % 10),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images_name, labels_name) in fm.IDX_FILES.items():
        images, labels = arrays[split]
        _write_idx(directory / images_name, images, compress)
        _write_idx(directory / labels_name, labels, compress)
    return arrays


@pytest.fixture(autouse=True)
def _no_system_dir_or_download(monkeypatch, tmp_path):
    """Never look at the real Debian files and never try the network."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-dir")

    def fail(root):
        raise DatasetError(f"download attempted into {root}")

    monkeypatch.setattr(fm, "_download_with_torchvision", fail)


@pytest.mark.parametrize("compress", [True, False])
def test_load_arrays(tmp_path, compress):
    expected = _write_dataset(tmp_path, compress)
    arrays = fm.load_arrays(tmp_path)
    for split in ("train", "test"):
        images, labels = arrays[split]
        assert images.dtype == np.uint8 and images.shape == expected[split][0].shape
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


@pytest.mark.parametrize("where", ["raw", "FashionMNIST/raw", "system"])
def test_idx_search_order(tmp_path, monkeypatch, where):
    directory = tmp_path / "system" if where == "system" else tmp_path / "root" / where
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    _write_dataset(directory, compress=True)
    assert fm.find_idx_dir(tmp_path / "root") == directory


def test_records_and_pngs(tmp_path):
    data_dir = tmp_path / "root"
    expected = _write_dataset(data_dir / "raw", compress=True)
    records = read_dataset("fashion-mnist", data_dir)
    assert [r.split for r in records] == ["train"] * 6 + ["test"] * 4
    assert records[3].label == fm.CLASS_NAMES[3] == "Dress"
    assert records[3].path == str(data_dir.resolve() / "images/train/Dress/00003.png")
    for record, pixels in zip(records, [*expected["train"][0], *expected["test"][0]]):
        rgb = np.asarray(load_rgb(record.path))
        np.testing.assert_array_equal(rgb, np.repeat(pixels[..., None], 3, axis=-1))
    marker = json.loads((data_dir / "images" / fm.MARKER_FILE).read_text())
    assert marker["counts"] == {"train": 6, "test": 4}
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_materialises_once_and_redoes_incomplete(tmp_path, monkeypatch):
    _write_dataset(tmp_path, compress=False)
    first = read_dataset("fashion-mnist", tmp_path)
    written = []
    monkeypatch.setattr(fm, "_encode_png", lambda pixels: written.append(1) or b"png")
    assert read_dataset("fashion-mnist", tmp_path) == first and not written  # complete: skipped
    (tmp_path / "images" / fm.MARKER_FILE).unlink()  # e.g. a foreign or older folder
    read_dataset("fashion-mnist", tmp_path)
    assert len(written) == 10
    assert (tmp_path / "images" / fm.MARKER_FILE).is_file()


def test_missing_files_give_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "_download_with_torchvision", REAL_DOWNLOAD)  # with torchvision unimportable
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as info:
        read_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path) in str(info.value) and "t10k-labels-idx1-ubyte" in str(info.value)


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "_download_with_torchvision", REAL_DOWNLOAD)  # with a torchvision that is offline
    import sys
    import types

    class OfflineFashionMNIST:
        def __init__(self, root, download):
            raise OSError("network unreachable")

    fake = types.ModuleType("torchvision.datasets")
    fake.FashionMNIST = OfflineFashionMNIST
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    with pytest.raises(DatasetError, match="download with torchvision failed: network unreachable"):
        fm.load_arrays(tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x00\x00\x05\x01", "bad magic"), (struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"abc", "expected 13")],
)
def test_bad_idx(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(DatasetError, match=message):
        fm.read_idx(tmp_path / "bad")
