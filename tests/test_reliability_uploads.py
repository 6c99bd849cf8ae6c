"""Hostile uploads to ``POST /api/search`` (issue 9): never a 5xx, always a JSON result or a JSON error that
names the problem, the app keeps answering, and memory stays bounded.

The corpus and the request generator live in benchmarks/fixtures/hostile_inputs.py; benchmarks/fuzz_search.py
runs the same generator for minutes against gunicorn over HTTP. Here it runs through Flask's test client with a
fixed seed: every corpus image once as it is, then a few hundred damaged images and broken requests drawn
by hypothesis. Every 200 is checked against a brute-force search of the gallery embeddings.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import catalog
from benchmarks.fixtures.hostile_inputs import (
    STRUCTURE_CASES,
    WEIRD_FIELD_VALUES,
    WEIRD_FILENAMES,
    broken_structure,
    check_answer,
    hostile_request,
    image_corpus,
    search_form,
)
from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval import preprocessing
from retrieval.embedder import OnnxEmbedder
from retrieval.preprocessing import Preprocessing, preprocess
from tests.test_webapp_api import build_gallery_of, png_bytes
from webapp import DEFAULT_MAX_BATCH, MAX_FORM_PARTS, create_app

#: Pillow warns about the broken files this module sends on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
    pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning"),
]

MAX_UPLOAD = 256 << 10
MAX_PIXELS = 250_000
DEFAULT_K, MAX_K = 4, 8
FUZZ_EXAMPLES = 400
#: Generous bounds: the app's own state is a few hundred kB; a leak of one decoded image per request,
#: or one request that resized a 1 × 200,000 upload whole (240 MB with this model), would exceed them.
RSS_GROWTH_LIMIT_MIB = 64
PEAK_GROWTH_LIMIT_MIB = 160


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=3)
    embedder = OnnxEmbedder(model)
    embeddings = {
        "colors": build_gallery_of(root / "colors", model, paths, embedder),
        "reds": build_gallery_of(root / "reds", model, [p for p in paths if p.parent.name == "red"], embedder),
    }
    app = create_app(
        [root / "colors", root / "reds"],
        max_upload_bytes=MAX_UPLOAD,
        default_k=DEFAULT_K,
        max_k=MAX_K,
        max_pixels=MAX_PIXELS,
    )
    return {"client": app.test_client(), "embedder": embedder, "embeddings": embeddings}


@pytest.fixture(scope="module")
def corpus():
    return image_corpus()


def post(served, request):
    response = served["client"].post("/api/search", data=request.body, content_type=request.content_type)
    return response.status_code, response.content_type, response.get_data()


def assert_correct(served, request, status, content_type, body) -> dict:
    """``check_answer``, and for a 200 the same ranking as brute force over the gallery's embeddings."""
    answer = check_answer(status, content_type, body)
    if status == 200:
        images = request.batch or (request.image,)
        assert images[0] is not None, f"{request.kind} was answered 200: {answer}"
        queries = answer["queries"] if request.batch else [answer]
        assert len(queries) == len(images), (request.kind, answer)
        name = request.index or "colors"
        k = DEFAULT_K if request.k is None or not request.k.strip() else int(request.k)
        gallery = served["embeddings"][name]
        for image, query_answer in zip(images, queries):
            query = served["embedder"].embed_images(
                [
                    catalog.decode_rgb(
                        image, max_pixels=MAX_PIXELS, min_side=served["embedder"].preprocessing.decode_side
                    )
                ]
            )[0]
            assert_top_k(query_answer["results"], gallery @ query, k, request.kind)
    return answer


def assert_top_k(results: list[dict], scores: np.ndarray, k: int, kind: str) -> None:
    """``results`` are the top ``k`` of brute-force ``scores``, best first, up to near-ties: two items whose
    cosines differ by less than the float32 noise of two embeddings may come in either order."""
    ids = [r["id"] for r in results]
    assert len(ids) == min(k, len(scores)) and len(set(ids)) == len(ids), (kind, results)
    np.testing.assert_allclose([r["score"] for r in results], scores[ids], atol=1e-5, err_msg=kind)
    best = np.sort(scores)[::-1][: len(ids)]
    np.testing.assert_allclose(scores[ids], best, atol=1e-5, err_msg=f"{kind}: not the top {k}")


def assert_still_serving(served) -> None:
    request = search_form(png_bytes(), k="3")
    status, content_type, body = post(served, request)
    assert status == 200
    assert_correct(served, request, status, content_type, body)


def memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_every_corpus_image_gets_a_result_or_a_named_error(served, corpus):
    outcomes: dict[str, str] = {}
    for name, data in corpus:
        request = search_form(data, k="3")
        status, content_type, body = post(served, request)
        answer = assert_correct(served, request, status, content_type, body)
        outcomes[name] = "ok" if status == 200 else answer["error"]
    formats = {name.split("/")[0] for name in outcomes if "/" in name}  # "FORMAT/MODE"
    # ICNS stores its image at up to 1024 × 1024, beyond this app's max_pixels: refused by size, so readable
    too_large = "cannot read the uploaded image: image too large"
    readable = {
        name.split("/")[0]
        for name, outcome in outcomes.items()
        if "/" in name and (outcome == "ok" or outcome.startswith(too_large))
    }
    assert len(formats) >= 15 and readable == formats, f"formats never read: {formats - readable}"
    expected_errors = {
        "zero-byte": "empty upload",
        "PNG declaring 100000×100000 (decompression bomb)": "decompression bomb",
        "PNG declaring 1000×1000 (over max_pixels)": "too large: 1000×1000",
        "GIF declaring 65535×65535": "decompression bomb",
        "BMP declaring 50000×50000": "decompression bomb",
    }
    for name, message in expected_errors.items():
        assert message in outcomes[name], (name, outcomes[name])
    regressions = [name for name in outcomes if name.startswith("regression:")]
    assert len(regressions) >= 4
    for name in regressions:
        assert "corrupt or unsupported image data" in outcomes[name], (name, outcomes[name])
    for name in (
        "animated GIF",
        "animated PNG",
        "CMYK JPEG",
        "16-bit PNG",
        "LA PNG",
        "RGBA PNG",
        "P PNG with transparency",
        "JPEG with corrupt EXIF",
        "PGM 200000×1 (extreme aspect ratio)",
        "PNG 1×200000 (extreme aspect ratio)",
        *[f"JPEG EXIF orientation {o}" for o in range(1, 9)],
    ):
        assert outcomes[name] == "ok", (name, outcomes[name])
    assert_still_serving(served)


def test_fuzzed_uploads_never_fail_and_memory_stays_bounded(served, corpus):
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for _ in range(20):  # warm up: allocator arenas, caches, onnxruntime buffers
        post(served, search_form(png_bytes(), k="3"))
    rss_before = memory_kib("VmRSS")
    peak_tracked = reset_peak_memory()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.randoms(use_true_random=False))
    def fuzz(rng: random.Random) -> None:
        request = hostile_request(rng, corpus, MAX_UPLOAD, index_names=("colors", "reds"))
        status, content_type, body = post(served, request)
        tried[request.kind.split(":")[0]] += 1
        statuses[status] += 1
        assert_correct(served, request, status, content_type, body)

    fuzz()
    assert_still_serving(served)
    rss_growth = (memory_kib("VmRSS") - rss_before) / 1024
    peak_growth = (memory_kib("VmHWM") - rss_before) / 1024 if peak_tracked else float("nan")
    print(
        f"\nfuzzed {sum(tried.values())} requests {dict(tried)}; statuses {dict(sorted(statuses.items()))}; "
        f"RSS growth {rss_growth:.1f} MiB, peak above start {peak_growth:.1f} MiB"
    )
    assert sum(tried.values()) >= FUZZ_EXAMPLES
    refused = sum(count for status, count in statuses.items() if status >= 400)
    assert statuses[200] >= FUZZ_EXAMPLES // 10 and refused >= FUZZ_EXAMPLES // 3
    assert rss_growth < RSS_GROWTH_LIMIT_MIB
    if peak_tracked:
        assert peak_growth < PEAK_GROWTH_LIMIT_MIB


EXPECTED_STRUCTURE_ERRORS = {
    "no image field": (400, "missing file field 'image'"),
    "image as a text field": (400, "missing file field 'image'"),
    "wrong field name": (400, "missing file field 'image'"),
    "JSON body": (400, "missing file field 'image'"),
    "urlencoded body": (400, "missing file field 'image'"),
    "raw image body": (400, "missing file field 'image'"),
    "multipart without boundary": (400, "missing file field 'image'"),
    "wrong boundary": (400, "missing file field 'image'"),
    "garbage multipart": (400, "missing file field 'image'"),
    "many parts": (413, f"form too large: at most {MAX_FORM_PARTS} parts"),
    "huge text field": (413, "form too large"),
    "oversized body": (413, "upload too large: the limit is 262,144 bytes per image"),
}


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_a_broken_request_gets_an_error_naming_it(served, case):
    rng = random.Random(case)
    for _ in range(5):
        request = broken_structure(rng, png_bytes(), MAX_UPLOAD, case)
        status, content_type, body = post(served, request)
        answer = check_answer(status, content_type, body)
        if case == "truncated multipart":  # depends on where the cut falls
            assert status == 400 and ("missing file field" in answer["error"] or "cannot read" in answer["error"])
            continue
        if request.batch:  # a search of several images: each one's results, up to the server's limit
            count = len(request.batch)
            if count <= DEFAULT_MAX_BATCH:
                assert status == 200 and len(answer["queries"]) == count, answer
                assert_correct(served, request, status, content_type, body)
            else:
                assert status == 400 and f"too many images: the file field 'image' holds {count};" in answer["error"]
            continue
        expected_status, message = EXPECTED_STRUCTURE_ERRORS[case]
        assert (status, message in answer["error"]) == (expected_status, True), answer
    assert_still_serving(served)


@pytest.mark.parametrize("filename", WEIRD_FILENAMES, ids=lambda name: repr(name[:24]))
def test_the_filename_is_never_used(served, filename):
    request = search_form(png_bytes(), filename=filename, content_type="text/plain", k="2")
    status, content_type, body = post(served, request)
    if b"\r\n" in filename or not _is_utf8(filename):  # the part's headers are broken: werkzeug drops the part
        assert status == 400 and "missing file field 'image'" in check_answer(status, content_type, body)["error"]
    else:
        assert status == 200
        assert_correct(served, request, status, content_type, body)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("value", WEIRD_FIELD_VALUES, ids=lambda value: repr(value[:12]))
def test_weird_k_and_index_values_are_named(served, value):
    for field in ("k", "index"):
        request = search_form(png_bytes(), **{field: value})
        status, content_type, body = post(served, request)
        answer = (
            assert_correct(served, request, status, content_type, body)
            if status == 200
            else check_answer(status, content_type, body)
        )
        if status != 200:
            assert ("k must be" in answer["error"]) if field == "k" else ("unknown index" in answer["error"])
            assert len(answer["error"]) < 300  # the value is quoted, cut to 64 characters


def test_a_window_resize_matches_the_whole_resize(monkeypatch):
    """The memory-bounded path of preprocessing (only the crop's window resampled) against the whole resize."""
    rng = np.random.default_rng(0)
    cases = [(2000, 7, 16, 20), (5, 900, 16, 20), (333, 41, 32, 36), (1200, 30, 224, 256), (640, 480, 64, 73)]
    windowed, whole = [], []
    for width, height, crop, resize in cases:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        spec = Preprocessing(crop, resize, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        whole.append(preprocess(image, spec))
        with monkeypatch.context() as patch:
            patch.setattr(preprocessing, "_MAX_RESIZED_PIXELS", 0)
            windowed.append(preprocess(image, spec))
        # independently: Pillow's whole resize, then torchvision's centre crop by hand
        short, long = sorted((width, height))
        new = (resize, int(resize * long / short))
        size = new if width <= height else new[::-1]
        pixels = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255
        top, left = int(round((size[1] - crop) / 2)), int(round((size[0] - crop) / 2))
        np.testing.assert_allclose(
            whole[-1], pixels[top : top + crop, left : left + crop].transpose(2, 0, 1), atol=1e-6
        )
    for a, b in zip(windowed, whole):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 2 / 255 + 1e-6


def test_an_extreme_aspect_ratio_is_preprocessed_in_bounded_memory():
    """A 1 × 200,000 image resized whole to a shorter side of 292 would need 51 GB; a child process limited
    to 1.5 GB of address space must preprocess it."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "from PIL import Image\n"
        "from retrieval.preprocessing import Preprocessing, preprocess\n"
        "spec = Preprocessing(256, 292, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))\n"
        "for size in ((1, 200_000), (200_000, 1), (3, 150_000)):\n"
        "    assert preprocess(Image.new('RGB', size, 'white'), spec).shape == (3, 256, 256)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr[-2000:]
