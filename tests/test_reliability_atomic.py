"""Writes that die halfway (issue 9): a full disk during ``sct index``, and a process killed (SIGKILL) while
writing a checkpoint-sized file or a gallery folder. Each time the previous file or folder is intact, keeps
loading and serving, and nothing half-written sits under the target's name."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.fixtures.tiny_onnx import make_color_images
from benchmarks.load_test import build_color_gallery
from core import atomic
from retrieval import gallery as gallery_module
from retrieval.gallery import Gallery, write_index
from sct.cli import main as sct_main
from webapp import create_app

ROOT = Path(__file__).resolve().parents[1]
NEW_CLASSES = {"cyan": (30, 200, 210), "magenta": (200, 30, 200)}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def served_labels(client) -> set[str]:
    request = search_form(
        Path(client.application.extensions["sct"].indexes["colors"].current().items[0].path).read_bytes(), k="5"
    )
    response = client.post("/api/search", data=request.body, content_type=request.content_type)
    assert response.status_code == 200, response.get_json()
    return {result["label"] for result in response.get_json()["results"]}


@pytest.fixture
def gallery(tmp_path):
    """A served gallery of red/green/blue images, and a folder of new (cyan/magenta) images to reindex with."""
    model, _, _ = build_color_gallery(tmp_path, tmp_path / "index_data" / "colors", per_class=4)
    make_color_images(tmp_path / "new", classes=NEW_CLASSES, per_class=4, seed=5)
    app = create_app([tmp_path / "index_data" / "colors"])
    return {
        "folder": tmp_path / "index_data" / "colors",
        "model": model,
        "new": tmp_path / "new",
        "client": app.test_client(),
    }


def _index_on_dev_full(real_open):
    """The index file is opened on /dev/full: every write to it fails with the kernel's ENOSPC."""

    def open_dev_full(path, mode="r", *args, **kwargs):
        return (
            real_open("/dev/full", mode, *args, **kwargs)
            if Path(path).name.startswith(".index.faiss")
            else real_open(path, mode, *args, **kwargs)
        )

    return open_dev_full


def _text_then_full_disk(real_write_text):
    def write_text(self, data, *args, **kwargs):
        if self.name == "items.csv":
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise ENOSPC
        return real_write_text(self, data, *args, **kwargs)

    return write_text


def _copy_then_full_disk(real_copyfile):
    def copyfile(source, target, *args, **kwargs):
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    return copyfile


def _fsync_full_disk(real_fsync):
    def fsync(descriptor):
        raise ENOSPC  # delayed allocation: ext4 and XFS report a full disk at fsync

    return fsync


FULL_DISK_AT = {
    "index.faiss": (gallery_module, "open", _index_on_dev_full),
    "items.csv": (pathlib.Path, "write_text", _text_then_full_disk),
    "model copy": (shutil, "copyfile", _copy_then_full_disk),
    "fsync": (os, "fsync", _fsync_full_disk),
}


@pytest.mark.parametrize("where", list(FULL_DISK_AT))
def test_a_full_disk_during_sct_index_keeps_the_previous_gallery(gallery, where, monkeypatch, capsys):
    folder = gallery["folder"]
    before = snapshot(folder)
    assert served_labels(gallery["client"]) <= {"red", "green", "blue"}
    command = ["index", "--model", str(gallery["model"]), "--images", str(gallery["new"]), "--out", str(folder)]
    owner, name, make_failing = FULL_DISK_AT[where]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, make_failing(getattr(owner, name, open)), raising=False)
        status = sct_main(command)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert error.startswith("error: ") and "No space left on device" in error, error
    assert f"cannot write gallery {folder}" in error and "previous version is unchanged" in error, error
    assert "Traceback" not in error
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["colors"]  # no staging folder left behind
    Gallery.load(folder)
    assert served_labels(gallery["client"]) <= {"red", "green", "blue"}

    assert sct_main(command) == 0  # with space again the same command works, and the server follows it
    assert served_labels(gallery["client"]) <= set(NEW_CLASSES)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("count", [10, 100_000])
def test_an_index_write_on_a_full_disk_raises(count):
    """/dev/full fails every write with ENOSPC. Given a path, faiss.write_index cuts a small index short
    without an error (it ignores a failed close); retrieval.gallery writes through a Python file instead."""
    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).standard_normal((count, 8)).astype(np.float32))
    with pytest.raises(OSError) as error:
        write_index(index, Path("/dev/full"))
    assert error.value.errno == errno.ENOSPC


CHILD_WRITES_A_CHECKPOINT = """
import os, sys, time
from core.atomic import atomic_file
with atomic_file(sys.argv[1]) as temporary:
    with open(temporary, "wb") as file:
        file.write(b"n" * (48 << 20))  # the first half of a 96 MB checkpoint
        file.flush()
        print("halfway", flush=True)
        time.sleep(120)
        file.write(b"n" * (48 << 20))
"""

CHILD_BUILDS_A_GALLERY = """
import sys, time
from pathlib import Path
import faiss
import retrieval.gallery as gallery
from benchmarks.load_test import build_color_gallery
real_write_index = faiss.write_index
def write_then_hang(index, path):
    real_write_index(index, path)
    print("halfway", flush=True)  # index.faiss written; manifest.json not yet
    time.sleep(120)
faiss.write_index = write_then_hang
build_color_gallery(Path(sys.argv[2]), Path(sys.argv[1]), classes={"cyan": (30, 200, 210)}, per_class=4, seed=5)
"""


def kill_halfway(code: str, *args: str) -> None:
    """Run ``code`` in a child Python, SIGKILL it once it prints "halfway"."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "halfway", child.stderr.read()
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    """training.run_folder writes last.pt and best.pt with atomic_write_bytes, i.e. through atomic_file."""
    run_folder_source = (ROOT / "training" / "run_folder.py").read_text()
    assert "atomic_write_bytes(self.path / LAST," in run_folder_source
    assert "atomic_write_bytes(self.path / BEST," in run_folder_source
    target = tmp_path / "last.pt"
    target.write_bytes(b"the checkpoint of epoch 3")
    kill_halfway(CHILD_WRITES_A_CHECKPOINT, str(target))
    assert target.read_bytes() == b"the checkpoint of epoch 3"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "last.pt")
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.tmp-")  # hidden, never named last.pt
    assert (tmp_path / leftovers[0]).stat().st_size == 48 << 20  # it really died halfway
    atomic.atomic_write_bytes(target, b"the checkpoint of epoch 4")  # and the next write is not disturbed
    assert target.read_bytes() == b"the checkpoint of epoch 4"


def test_sigkill_while_building_a_gallery_leaves_the_previous_folder(gallery, tmp_path):
    folder = gallery["folder"]
    before = snapshot(folder)
    kill_halfway(CHILD_BUILDS_A_GALLERY, str(folder), str(tmp_path / "child"))
    assert snapshot(folder) == before
    leftovers = [p.name for p in folder.parent.iterdir() if p.name != "colors"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".colors.tmp-")  # the staging folder, hidden
    assert Gallery.load(folder).manifest["count"] == 12
    assert served_labels(gallery["client"]) <= {"red", "green", "blue"}
