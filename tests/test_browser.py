"""The web app in a real browser (playwright + Debian's chromium) against a real HTTP server:
upload a query, see the results, open a pair view with both heatmaps, open the evaluation page, come back;
search for more like a result; browse the evaluation from a failing query to its wrong result's pair view."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from benchmarks.fixtures.tiny_onnx import COLORS, make_color_images, make_tiny_model
from retrieval.embedder import OnnxEmbedder
from sct.cli import main
from tests.test_webapp_api import build_gallery_of, png_bytes
from webapp import create_app

CHROMIUM = Path(os.environ.get("SCT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
LOADED = "image => image.complete && image.naturalWidth > 0"
#: A red so close to COLORS["red"] that the tiny model confuses the two classes: queries that fail at Recall@1.
CRIMSON = (219, 30, 31)


def wait_for_results(page, count: int) -> None:
    """Wait until the page lists `count` results and every result image has loaded.

    Waiting on the images alone would pass at once before the results render: every() of no images is true.
    """
    page.wait_for_function(
        f"() => {{ const images = [...document.querySelectorAll('#results img')];"
        f" return document.querySelectorAll('#results a.result').length === {count}"
        f" && images.length > 0 && images.every({LOADED}); }}"
    )


sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set SCT_CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The app on 127.0.0.1 and a free port, in a background thread; yields its base URL."""
    root = tmp_path_factory.mktemp("browser")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", classes={**COLORS, "crimson": CRIMSON}, per_class=3)
    folder = root / "colors"
    build_gallery_of(folder, model, paths, OnnxEmbedder(model))
    assert main(["eval", "--index", str(folder), "--k", "1", "2", "4"]) == 0  # eval.json and eval_queries.npz
    httpd = make_server("127.0.0.1", 0, create_app([folder], default_k=6), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(10_000)
        yield context.new_page()
        browser.close()


def test_search_then_pair_view_then_evaluation(server, page, tmp_path):
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(color=(30, 40, 210), size=(40, 30)))  # a blue image
    page.goto(server + "/")
    page.set_input_files("#image-input", str(query))

    wait_for_results(page, 6)
    results = page.locator("#results a.result")
    assert results.first.locator(".label").inner_text() == "blue"
    assert "results from colors" in page.locator("#status").inner_text()

    results.first.click()
    page.wait_for_url("**/pair?**")
    assert page.locator("#pair-label").inner_text() == "blue"
    assert 0 < float(page.locator("#pair-cosine").inner_text()) <= 1
    for heatmap in ("#query-heatmap", "#item-heatmap"):
        page.wait_for_function(f"({LOADED})(document.querySelector('{heatmap}'))")
        assert page.eval_on_selector(heatmap, "image => image.naturalWidth") > 256  # image + colour bar

    page.click("#evaluation-link")
    page.wait_for_url("**/evaluation?index=colors")
    page.wait_for_function(f"({LOADED})(document.querySelector('#recall-curve'))")
    assert "Recall@K" in page.locator("#evaluation").inner_text()

    page.go_back()
    page.go_back()  # the search page again: it shows the last search, kept for this tab
    page.wait_for_selector("#results a.result")
    assert page.locator("#results a.result").count() == 6 and page.locator("#preview").is_visible()


def test_a_bad_upload_shows_the_servers_reason(server, page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes()[:60])
    page.goto(server + "/")
    page.set_input_files("#image-input", str(broken))
    page.wait_for_selector("#status.error")
    assert "cannot read the uploaded image" in page.locator("#status").inner_text()
    assert page.locator("#results a.result").count() == 0  # also those of an earlier search


def test_an_expired_pair_link_shows_an_error_page(server, page):
    response = page.goto(server + "/pair?query=expired&item=0")
    assert response.status == 404
    assert "unknown or expired query id" in page.locator("#error-message").inner_text()


def test_the_pages_work_under_their_content_security_policy(server, page, tmp_path):
    """Search, pair view, evaluation and the restored search raise no CSP violation; inline code is blocked."""
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(color=(30, 40, 210), size=(40, 30)))
    blocked = []  # Chromium reports each violation in the console too

    def on_console(message) -> None:
        if "Content Security Policy" in message.text:
            blocked.append(message.text)

    page.on("console", on_console)
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', event =>"
        " (window.violations ||= []).push(`${event.violatedDirective} ${event.blockedURI}`))"
    )

    def violations() -> list[str]:
        return page.evaluate("window.violations || []") + blocked

    page.goto(server + "/")
    page.set_input_files("#image-input", str(query))
    wait_for_results(page, 6)
    assert violations() == []

    page.locator("#results a.result").first.click()
    page.wait_for_url("**/pair?**")
    page.wait_for_function(f"['#query-heatmap', '#item-heatmap'].every(s => ({LOADED})(document.querySelector(s)))")
    assert violations() == []

    page.click("#evaluation-link")
    page.wait_for_function(f"({LOADED})(document.querySelector('#recall-curve'))")
    assert violations() == []

    page.go_back()
    page.go_back()  # the restored search shows its query from a data: URL
    page.wait_for_function(f"({LOADED})(document.querySelector('#preview'))")
    wait_for_results(page, 6)
    assert violations() == []

    ran = page.evaluate("""() => {
        const script = document.createElement("script");
        script.textContent = "window.inlineRan = true";
        document.body.append(script);
        return window.inlineRan === true;
    }""")
    assert not ran
    page.wait_for_function("(window.violations || []).length > 0")
    assert violations()[0].startswith("script-src")
    page.remove_listener("console", on_console)


def test_more_like_this_searches_with_a_result_as_the_query(server, page, tmp_path):
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(color=(30, 40, 210), size=(40, 30)))
    page.goto(server + "/")
    page.set_input_files("#image-input", str(query))
    wait_for_results(page, 6)
    first = page.locator("#results .hit").first
    item = first.locator("a.more-like-this").get_attribute("href").split("item=")[1].split("&")[0]

    first.locator("a.more-like-this").click()
    page.wait_for_url(f"**/?item={item}&index=colors")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('like gallery item')")
    wait_for_results(page, 6)
    assert f"like gallery item #{item}" in page.locator("#status").inner_text()
    assert page.locator("#query-caption").inner_text() == f"Gallery item #{item} · blue"
    page.wait_for_function(f"({LOADED})(document.querySelector('#preview'))")
    assert page.eval_on_selector("#preview", "image => new URL(image.src).pathname") == f"/api/items/{item}/image"
    hrefs = page.eval_on_selector_all("#results a.result", "links => links.map(link => link.href)")
    assert all(f"query_item={item}&" in href for href in hrefs)
    assert f"item={item}&" not in " ".join(href.split("query_item=")[1].split("&", 1)[1] for href in hrefs)
    assert page.locator("#results a.result .label").first.inner_text() == "blue"

    page.locator("#results a.result").first.click()  # an item pair: works without any query kept by the server
    page.wait_for_url("**/pair?query_item=**")
    page.wait_for_function(f"['#query-heatmap', '#item-heatmap'].every(s => ({LOADED})(document.querySelector(s)))")
    page.click("#more-like-item")  # the pair page's link runs an item search on the search page
    page.wait_for_url("**/?item=**")
    wait_for_results(page, 6)

    page.go_back()
    page.go_back()  # the first item search, from its URL
    page.wait_for_url(f"**/?item={item}&index=colors")
    wait_for_results(page, 6)
    assert f"like gallery item #{item}" in page.locator("#status").inner_text()
    page.go_back()  # the image search, kept for this tab
    page.wait_for_function("() => !document.querySelector('#status').textContent.includes('like gallery item')")
    wait_for_results(page, 6)
    assert page.locator("#query-caption").is_hidden()


def test_evaluation_browser_from_a_failing_query_to_its_wrong_results_pair_view(server, page):
    """Evaluation page → failing queries → one query's rank list → its wrong result's pair view, whose two heatmaps
    show more than one cell; then "More like this" from the rank list. No step breaks the CSP."""
    violations = []
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))
    page.goto(server + "/evaluation?index=colors")
    page.wait_for_function(f"({LOADED})(document.querySelector('#similarity-histogram'))")
    assert page.eval_on_selector("#similarity-histogram", "image => image.naturalWidth") > 600
    assert "fail at Recall@1" in page.locator("#failing-summary").inner_text()
    assert page.locator("#worst-classes tbody tr").count() == 4

    page.click("#failures-link")
    page.wait_for_url("**/evaluation/failures?index=colors")
    failures = page.locator("#failures li.failure")
    assert failures.count() >= 1
    first = failures.first
    assert first.locator(".ranked-list li.ranked").first.get_attribute("class") == "ranked wrong"
    assert "✗" in first.locator(".ranked-list li.ranked").first.inner_text()

    first.locator("a.failure-query").click()
    page.wait_for_url("**/evaluation/query?index=colors&row=*")
    page.wait_for_function(f"({LOADED})(document.querySelector('#query-image'))")
    label = page.locator("#query-label").inner_text()
    ranked = page.locator("#rank-list li.ranked")
    assert ranked.count() == 10
    wrong = page.locator("#rank-list li.ranked.wrong").first
    wrong_label = wrong.locator(".label").inner_text()
    assert wrong_label != label and "✗" in wrong.locator(".mark").inner_text()
    assert page.locator("#rank-list li.ranked.correct .mark").first.inner_text().startswith("✓")

    wrong.locator("a.pair-link").click()
    page.wait_for_url("**/pair?query_item=*")
    assert page.locator("#pair-label").inner_text() == wrong_label
    for heatmap in ("#query-heatmap", "#item-heatmap"):
        page.wait_for_function(f"({LOADED})(document.querySelector('{heatmap}'))")
        assert page.eval_on_selector(heatmap, "image => image.naturalWidth") > 256
        rows, columns = map(int, page.get_attribute(heatmap, "data-grid").split("x"))
        assert rows * columns > 1
    pair = page.evaluate("async () => (await fetch('/api/pair' + location.search)).json()")
    for cells in (pair["query_cells"], pair["item_cells"]):
        assert len(cells) > 1 and len(cells[0]) > 1
    assert pair["item"]["label"] == wrong_label and pair["query_item"]["label"] == label

    page.go_back()
    page.wait_for_url("**/evaluation/query?**")
    page.locator("#rank-list li.ranked a.more-like-this").first.click()
    page.wait_for_url("**/?item=*&index=colors")
    wait_for_results(page, 6)
    assert "like gallery item #" in page.locator("#status").inner_text()
    assert violations == []
