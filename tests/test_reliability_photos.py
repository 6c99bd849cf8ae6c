"""Real photos upload: 0.1 to 15 MB in every common format, through Flask's client and a real gunicorn server,
with the cost of each decode bounded and the memory given back after a burst.

Before, most photos over a megabyte were refused (413: werkzeug counted file bytes held back at the end of a
64 KiB read against the 64 KiB text-field limit), and a 16-bit PNG of 40 megapixels took 1.1 GB to decode."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.hostile_inputs import multipart, search_form
from benchmarks.fixtures.photos import amplifier_png, boundary_at_every_read, photo_corpus, rotated_jpeg, scene
from benchmarks.load_test import build_color_gallery, running_server
from catalog import decode_rgb
from retrieval.embedder import OnnxEmbedder
from retrieval.preprocessing import preprocess
from tests.test_webapp_api import png_bytes
from webapp import MiB, create_app

K = 5
UPLOAD_LIMIT = 16 * MiB
#: The stated bound on the memory one upload may take at the default limits (docs/RELIABILITY.md).
PEAK_PER_DECODE_MIB = 300


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    model, embeddings, labels = build_color_gallery(root, root / "colors")
    return {"root": root, "folder": root / "colors", "model": model, "embeddings": embeddings,
            "embedder": OnnxEmbedder(model)}  # fmt: skip


@pytest.fixture(scope="module")
def client(gallery):
    return create_app([gallery["folder"]], max_upload_bytes=UPLOAD_LIMIT).test_client()


def _search(client, data: bytes, name: str):
    return client.post(
        "/api/search", data={"image": (io.BytesIO(data), name), "k": str(K)}, content_type="multipart/form-data"
    )


def _bounded_embedding(gallery, data: bytes) -> np.ndarray:
    spec = gallery["embedder"].preprocessing
    return gallery["embedder"].embed_images([decode_rgb(data, min_side=spec.decode_side)])[0]


def test_every_photo_is_accepted_and_scored_exactly(client, gallery):
    """Each photo answers 200 with the brute-force scores of its embedding, and decoding only what the model
    needs (draft, reduction) keeps that embedding within a cosine of 0.995 of a full decode's."""
    for photo in photo_corpus():
        response = _search(client, photo.data, photo.name)
        assert response.status_code == 200, (photo.name, len(photo.data), response.get_json())
        results = response.get_json()["results"]
        query = _bounded_embedding(gallery, photo.data)
        scores = gallery["embeddings"] @ query
        returned = [result["score"] for result in results]
        np.testing.assert_allclose(
            returned, scores[[result["id"] for result in results]], atol=1e-5, err_msg=photo.name
        )
        np.testing.assert_allclose(returned, np.sort(scores)[::-1][:K], atol=1e-5, err_msg=photo.name)
        full = gallery["embedder"].embed_images([decode_rgb(photo.data)])[0]
        assert float(full @ query) >= 0.995, photo.name


def test_file_bytes_ending_every_read_with_a_cr_are_accepted(client):
    """The deterministic worst case of the old 413: a CR as the last byte of every 64 KiB read of the body."""
    image = png_bytes(size=(40, 30))
    prefix = multipart([("image", b"query.png", "image/png", b"")]).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    padding = boundary_at_every_read(1 << 20, 64 << 10, offset=len(prefix) + len(image))
    form = search_form(image + padding)
    assert form.body.startswith(prefix)
    response = client.post("/api/search", data=form.body, content_type=form.content_type)
    assert response.status_code == 200, response.get_json()


def test_an_exif_rotated_photo_is_searched_upright(client, gallery):
    upright = scene(1200, 900, seed=21)
    rotated = rotated_jpeg(upright, quality=95)
    spec = gallery["embedder"].preprocessing
    as_searched = preprocess(decode_rgb(rotated, min_side=spec.decode_side), spec)
    expected = preprocess(upright, spec)
    stored = preprocess(upright.transpose(Image.Transpose.ROTATE_90), spec)
    assert np.abs(as_searched - expected).mean() < 0.1 < np.abs(as_searched - stored).mean()
    response = _search(client, rotated, "rotated.jpg")
    assert response.status_code == 200
    query = gallery["embedder"].embed_images([upright])[0]
    for result in response.get_json()["results"]:
        assert result["score"] == pytest.approx(float(gallery["embeddings"][result["id"]] @ query), abs=0.01)


def _http_search(url: str, data: bytes, name: str) -> tuple[int, dict]:
    form = search_form(data, filename=name.encode(), content_type=None, k=str(K))
    request = urllib.request.Request(url + "/api/search", data=form.body, headers={"Content-Type": form.content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_photos_and_an_image_of_exactly_the_limit_through_gunicorn(client, gallery):
    with running_server([gallery["folder"]], threads=2, log_dir=gallery["root"]) as server:
        for photo in photo_corpus():
            status, answer = _http_search(server.url, photo.data, photo.name)
            assert status == 200, (photo.name, answer, server.log_tail())
            local = _search(client, photo.data, photo.name).get_json()["results"]
            assert [r["id"] for r in answer["results"]] == [r["id"] for r in local], photo.name
        jpeg = photo_corpus()[1].data
        at_limit = jpeg + bytes(UPLOAD_LIMIT - len(jpeg))  # Pillow ignores what follows the image
        status, answer = _http_search(server.url, at_limit, "at-limit.jpg")
        assert status == 200, answer
        status, answer = _http_search(server.url, at_limit + b"\0", "over-limit.jpg")
        assert status == 413 and answer["error"] == "upload too large: the limit is 16 MiB per image"
        status, answer = _http_search(server.url, jpeg[: len(jpeg) // 3], "truncated.jpg")
        assert status == 400 and "cannot read the uploaded image" in answer["error"]
        assert server.process.poll() is None
    assert "Traceback" not in server.log.read_text(), server.log_tail()  # refused uploads are no server errors


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine (apt-get install curl)")
def test_curl_uploads_photos_of_several_megabytes(gallery):
    """curl as people run it: `curl -F image=@photo.jpg`, which asks for 100-continue before a large body."""
    with running_server([gallery["folder"]], threads=2, log_dir=gallery["root"]) as server:
        for photo in photo_corpus():
            path = gallery["root"] / photo.name
            path.write_bytes(photo.data)
            done = subprocess.run(
                ["curl", "-sS", "-F", f"image=@{path}", "-w", "\n%{http_code}", server.url + "/api/search"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            body, status = done.stdout.rsplit("\n", 1)
            assert status == "200", (photo.name, status, body, done.stderr)
            assert len(json.loads(body)["results"]) == 10, photo.name


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


def test_a_burst_of_amplifying_uploads_is_bounded_and_its_memory_returned(gallery):
    """6300² 16-bit PNGs, just under the 40-megapixel limit: one takes less than PEAK_PER_DECODE_MIB at its peak,
    four at once leave /healthz answering, and the worker's memory comes back down afterwards."""
    amplifier = amplifier_png(6300)
    with running_server([gallery["folder"]], threads=2, log_dir=gallery["root"]) as server:
        worker = server.pids()[1]
        assert _http_search(server.url, png_bytes(), "warm-up.png")[0] == 200
        Path(f"/proc/{worker}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux): the peak of what follows
        before = _status_mib(worker, "VmRSS")
        assert _status_mib(worker, "VmHWM") - before < 8
        status, answer = _http_search(server.url, amplifier, "amplifier.png")
        assert status == 200, answer
        peak = _status_mib(worker, "VmHWM") - before
        assert peak < PEAK_PER_DECODE_MIB, f"one decode took {peak:.0f} MiB"

        statuses: list[int] = []
        burst = [
            threading.Thread(target=lambda: statuses.append(_http_search(server.url, amplifier, "a.png")[0]))
            for _ in range(4)
        ]
        for thread in burst:
            thread.start()
        slowest = 0.0
        while any(thread.is_alive() for thread in burst):
            started = time.monotonic()
            with urllib.request.urlopen(server.url + "/healthz", timeout=10) as response:
                assert response.status == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        assert statuses == [200] * 4
        assert slowest < 2.0, f"/healthz took {slowest:.2f} s during the burst"
        after = _status_mib(worker, "VmRSS")
        assert after - before < 64, f"worker memory stayed up: {before:.0f} → {after:.0f} MiB"
