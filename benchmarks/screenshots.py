"""Screenshots of the web app for the README: the search page with the results of one query, and the pair view
of one result with its two similarity heatmaps.

The gallery folder (built by `sct index`) is served by `webapp.create_app` on 127.0.0.1 and a free port, in this
process; a headless Chromium (playwright, Debian's /usr/bin/chromium by default) uploads the query through the
page's file input, waits until every result image has loaded, saves the search page, clicks the chosen result,
waits for both heatmaps and saves the pair view. The PNGs are reduced to a 256-colour palette (`--colors`), which
keeps a 1200×800 screenshot of the page well under 300 KB.

The query should not be in the gallery, or the first result is the query itself (cosine 1).

    python -m benchmarks.screenshots --index index_data/glyphs --query glyph.png               # → docs/images/
    python -m benchmarks.screenshots --index index_data/fashion-mnist --query shoe.png --result 2 --out /tmp/shots
    python -m benchmarks.screenshots --index index_data/cub --query bird.jpg --width 1400 --height 900 --k 8

The README's screenshots (docs/images/search.png, pair.png and eval-query.png) show the demo's gallery (the
10,000 Fashion-MNIST test images, `sct demo --no-serve`), a training image of a bag as the query, and the rank
list of query row 145, a shirt that fails at Recall@1:

    sct demo --no-serve
    python -m benchmarks.screenshots --index index_data/fashion-mnist \
        --query data/fashion-mnist/images/train/Bag/00100.png --k 8 --eval-query 145
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
LOADED = "image => image.complete && image.naturalWidth > 0"


@contextmanager
def serving(index: Path, k: int) -> Iterator[str]:
    """The app serving `index` on 127.0.0.1 and a free port, in a background thread; yields its base URL."""
    from werkzeug.serving import make_server

    from webapp import create_app

    httpd = make_server("127.0.0.1", 0, create_app([index], default_k=k), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        thread.join()


def save_png(data: bytes, path: Path, colors: int) -> int:
    """Write the screenshot `data` to `path`, reduced to a palette of `colors` (0: as taken); returns its bytes."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if colors:
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path.stat().st_size


def take(base_url: str, query: Path, result: int, args: argparse.Namespace) -> tuple[bytes, bytes, bytes | None]:
    """Search with `query`, then open result number `result` (1 = the first); the two pages' screenshots, and with
    ``--eval-query`` the evaluation browser's rank list of that query row."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(args.chromium), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": args.width, "height": args.height})
            context.set_default_timeout(args.timeout * 1000)
            page = context.new_page()
            page.goto(base_url + "/")
            page.set_input_files("#image-input", str(query))
            page.wait_for_function(
                "() => { const images = [...document.querySelectorAll('#results img')];"
                f" return document.querySelectorAll('#results a.result').length > 0"
                f" && images.length > 0 && images.every({LOADED})"
                f" && document.querySelector('#preview').complete; }}"
            )
            count = page.locator("#results a.result").count()
            if not 1 <= result <= count:
                raise SystemExit(f"error: --result {result}: the search returned {count} results")
            search = page.screenshot(full_page=args.full_page)
            page.locator("#results a.result").nth(result - 1).click()
            page.wait_for_url("**/pair?**")
            page.wait_for_function(
                f"['#query-heatmap', '#item-heatmap'].every(s => ({LOADED})(document.querySelector(s)))"
            )
            pair = page.screenshot(full_page=args.full_page)
            rank_list = None
            if args.eval_query is not None:  # one evaluation query's rank list, marked correct and wrong
                page.goto(f"{base_url}/evaluation/query?index={args.index.name}&row={args.eval_query}")
                page.wait_for_function(
                    f"() => [...document.querySelectorAll('#rank-list img, #query-image')].every({LOADED})"
                )
                rank_list = page.screenshot(full_page=args.full_page)
        finally:
            browser.close()
    return search, pair, rank_list


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.screenshots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", type=Path, required=True, help="gallery folder built by `sct index`")
    parser.add_argument("--query", type=Path, required=True, help="query image to upload")
    parser.add_argument("--result", type=int, default=1, help="which result's pair view to open (1 = the first)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "images",
        help="folder for search.png, pair.png (and eval-query.png) (default: docs/images)",
    )
    parser.add_argument("--k", type=int, default=10, help="results to show (default: 10)")
    parser.add_argument(
        "--eval-query",
        type=int,
        metavar="ROW",
        help="also save eval-query.png: the rank list of row ROW of the gallery's evaluation (run sct eval first)",
    )
    parser.add_argument("--width", type=int, default=1200, help="viewport width in px (default: 1200)")
    parser.add_argument("--height", type=int, default=800, help="viewport height in px (default: 800)")
    parser.add_argument("--full-page", action="store_true", help="capture the whole page, not just the viewport")
    parser.add_argument(
        "--colors", type=int, default=256, help="palette size of the saved PNGs; 0 keeps full colour (default: 256)"
    )
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"), help="Chromium executable")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for each page (default: 60)")
    args = parser.parse_args()
    for path, what in (
        (args.index / "manifest.json", "gallery folder"),
        (args.query, "query image"),
        (args.chromium, "Chromium"),
    ):
        if not path.is_file():
            print(f"error: no {what}: {path} not found", file=sys.stderr)
            return 2
    with serving(args.index, args.k) as base_url:
        search, pair, rank_list = take(base_url, args.query, args.result, args)
    for name, data in (("search.png", search), ("pair.png", pair), ("eval-query.png", rank_list)):
        if data is None:
            continue
        size = save_png(data, args.out / name, args.colors)
        print(f"wrote {args.out / name}: {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
