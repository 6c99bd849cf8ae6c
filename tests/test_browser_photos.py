"""Photos of several megabytes searched from Chromium's page against a real ``sct serve`` (gunicorn).

Uploading a phone photo is the first thing a person does with the engine; before, a 1 MB JPEG chosen in the
page came back as "413 form too large"."""

from __future__ import annotations

import pytest

from benchmarks.fixtures.photos import photo_corpus
from benchmarks.load_test import build_color_gallery, running_server
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, sync_api

#: A 15 MB camera JPEG, an EXIF-rotated phone JPEG, a 7 MB PNG with transparency and a 16-bit PNG scan.
PHOTOS = (
    "camera-6000x4000.jpg",
    "phone-4032x3024-rotated.jpg",
    "transparent-2000x1500.png",
    "scan-3000x2000-16bit.png",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-photos")
    build_color_gallery(root, root / "colors")
    with running_server([root / "colors"], threads=2, log_dir=root) as server:
        yield server


def test_photos_of_several_megabytes_are_searched_from_the_page(server, tmp_path):
    photos = {photo.name: photo for photo in photo_corpus()}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url + "/")
        for name in PHOTOS:
            path = tmp_path / name
            path.write_bytes(photos[name].data)
            page.set_input_files("#image-input", str(path))
            page.wait_for_function("() => !document.querySelector('#search-form').hasAttribute('aria-busy')")
            status = page.locator("#status")
            assert "error" not in (status.get_attribute("class") or ""), (name, status.inner_text())
            assert page.locator("#results a.result").count() > 0, name
            assert "results from colors" in status.inner_text(), name
        browser.close()
    assert server.process.poll() is None
