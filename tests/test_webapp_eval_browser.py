"""The evaluation browser: the per-query section of /evaluation, the class and failing-query lists, a query's rank
list, the similarity histogram, and what they say when eval_queries.npz is missing, unreadable or stale.

The per-query files come from ``sct eval`` itself, except a made-up one of many classes for the page lists."""

from __future__ import annotations

import importlib
import io
import re
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import Gallery
from retrieval.query_results import (
    QUERY_RESULTS_FILE,
    QueryResults,
    failing_rows,
    load_query_results,
    per_class,
    save_query_results,
)
from sct.cli import main
from tests.test_webapp_api import build_gallery_of
from webapp import create_app
from webapp.query_browser import LoadedQueries

#: Two reds close enough that the tiny model confuses some of them: queries that fail at Recall@1.
CONFUSABLE = {"red": (200, 40, 40), "crimson": (199, 40, 41), "green": (30, 200, 40), "blue": (30, 40, 210)}
BINS = 100


def many_classes(gallery: Gallery, rows: int = 130, classes: int = 120) -> QueryResults:
    """A made-up file of many classes and failing queries over ``gallery``'s ids, for the page lists."""
    rng = np.random.default_rng(0)
    count = len(gallery.items)
    return QueryResults(
        query_item=rng.integers(0, count, rows),
        query_path=np.zeros(0, "S1"),
        label=np.arange(rows) % classes,
        label_names=np.array([f"class {i:03d}" for i in range(classes)]),
        first_correct_rank=np.where(np.arange(rows) % 7 == 0, 1, 2 + np.arange(rows) % 3),
        relevant=np.full(rows, 3),
        ap_at_r=rng.random(rows),
        r_precision=rng.random(rows),
        top_ids=rng.integers(0, count, (rows, 6)),
        top_scores=np.sort(rng.random((rows, 6)), axis=1)[:, ::-1],
        depth=count - 1,
        mode="leave-one-out",
        model_sha256=gallery.manifest["model_sha256"],
        hist_edges=np.linspace(-1, 1, BINS + 1),
        hist_positive=rng.integers(0, 5, BINS),
        hist_negative=rng.integers(0, 50, BINS),
        hist_queries=rows,
    )


def sct_eval(folder: Path, *options: str) -> QueryResults:
    """``sct eval --index folder`` as run from the command line; its eval_queries.npz."""
    assert main(["eval", "--index", str(folder), "--k", "1", "2", "4", *options]) == 0
    results = load_query_results(folder)
    assert results is not None
    return results


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_browser")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", classes=CONFUSABLE, per_class=5)
    embedder = OnnxEmbedder(model)
    names = ("evaluated", "bare", "fresh", "many", "external")
    for name in names:
        build_gallery_of(root / "index_data" / name, model, paths, embedder)
    folders = {name: root / "index_data" / name for name in names}
    galleries = {name: Gallery.load(folder) for name, folder in folders.items()}
    results = sct_eval(folders["evaluated"])
    sct_eval(folders["bare"])
    (folders["bare"] / QUERY_RESULTS_FILE).unlink()  # as left by an sct eval that wrote no per-query file
    save_query_results(many_classes(galleries["many"]), folders["many"] / QUERY_RESULTS_FILE)
    query_paths = make_color_images(root / "queries", classes=CONFUSABLE, per_class=2, seed=5)
    external = sct_eval(folders["external"], "--queries-images", str(root / "queries"))
    app = create_app(list(folders.values()))
    return {"app": app, "client": app.test_client(), "folders": folders, "galleries": galleries,
            "results": results, "external": external, "query_paths": query_paths}  # fmt: skip


def html_of(client, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)[-500:]
    assert response.mimetype == "text/html"
    return response.get_data(as_text=True)


def listed_rows(html: str) -> list[int]:
    return [int(row) for row in re.findall(r'<li class="failure" data-row="(\d+)"', html)]


def ranked_items(html: str) -> list[tuple[int, str]]:
    """(item id, "correct" or "wrong") of each ranked result on a page, in order."""
    return [
        (int(item), kind) for kind, item in re.findall(r'<li class="ranked (correct|wrong)" data-item="(\d+)"', html)
    ]


def test_the_fixture_gallery_has_failing_queries(served):
    results = served["results"]
    assert len(results) == 20 and 0 < len(failing_rows(results)) < 20
    assert {c.label for c in per_class(results) if c.recall_at_1 < 1} <= {"red", "crimson"}


def test_what_the_pages_show_agrees_with_numpy_over_the_stored_vectors(served):
    """Each row's top ids and scores (which the pages show) against brute force over the gallery's vectors: the
    scores are those ids' cosines with the query, best first, the query itself left out, and the first correct
    rank is the first of them with the query's label."""
    gallery, results = served["galleries"]["evaluated"], served["results"]
    vectors, labels = gallery.embeddings(), np.asarray(gallery.labels)
    for row in range(len(results)):
        query, ids = int(results.query_item[row]), results.top_ids[row]
        cosines = vectors @ vectors[query]
        np.testing.assert_allclose(results.top_scores[row], cosines[ids], atol=1e-5)
        assert query not in ids and np.all(np.diff(results.top_scores[row]) <= 1e-6)
        others = np.delete(np.arange(len(vectors)), query)
        assert results.top_scores[row, 0] == pytest.approx(cosines[others].max(), abs=1e-5)
        correct = labels[ids] == results.label_of(row)
        assert results.first_correct_rank[row] == int(np.argmax(correct)) + 1


def test_evaluation_page_summarises_the_queries_and_the_worst_classes(served):
    html = html_of(served["client"], "/evaluation?index=evaluated")
    results = served["results"]
    failing = len(failing_rows(results))
    assert f"<strong>{failing}</strong> of 20\n        queries fail at Recall@1" in html
    assert 'id="similarity-histogram" src="/api/evaluation/similarities.png?index=evaluated"' in html
    assert 'href="/evaluation/failures?index=evaluated" id="failures-link"' in html
    table = html[html.index('id="worst-classes"') :]
    table = table[: table.index("</table>")]
    shown = re.findall(r'<a href="/evaluation/failures\?index=evaluated&amp;label=(\w+)">', table)
    assert shown == [c.label for c in per_class(results)]  # 4 classes: all of them, worst first
    worst = per_class(results)[0]
    assert f"{100 * worst.recall_at_1:.2f}%" in table and f"{100 * worst.map_at_r:.2f}%" in table


def test_without_eval_queries_npz_the_page_says_to_run_sct_eval_again(served):
    html = html_of(served["client"], "/evaluation?index=bare")
    assert 'id="no-query-results"' in html and "no per-query results (eval_queries.npz)" in html
    assert "run `sct eval --index DIR` on the folder of gallery bare again" in html
    html = html_of(served["client"], "/evaluation?index=fresh")  # not evaluated at all: the page says so once
    assert "not been evaluated yet" in html and 'id="per-query"' not in html
    for url in (
        "/evaluation/failures?index=bare",
        "/evaluation/classes?index=bare",
        "/evaluation/query?index=bare&row=0",
    ):
        assert "has no per-query results (eval_queries.npz) yet" in unescape(html_of(served["client"], url, 404))
    response = served["client"].get("/api/evaluation/similarities.png?index=bare")
    assert response.status_code == 404 and "sct eval --index DIR" in response.get_json()["error"]


def test_failures_list_the_failing_rows_with_their_top_results(served):
    results, gallery = served["results"], served["galleries"]["evaluated"]
    html = html_of(served["client"], "/evaluation/failures?index=evaluated")
    expected = failing_rows(results).tolist()
    assert listed_rows(html) == expected
    assert f"{len(expected)} of 20 queries fail." in html
    for row in expected:
        entry = html[html.index(f'data-row="{row}"') :]
        entry = entry[: entry.index("</li>\n        \n")] if "</li>\n        \n" in entry else entry
        query = int(results.query_item[row])
        assert f'href="/evaluation/query?index=evaluated&amp;row={row}"' in entry
        assert f'src="/api/items/{query}/image?index=evaluated"' in entry
        first = int(results.first_correct_rank[row])
        assert f"first correct: #{first}" in entry
        top = results.top_ids[row, :5].tolist()
        label = results.label_of(row)
        marks = [(item, "correct" if gallery.items[item].label == label else "wrong") for item in top]
        assert ranked_items(entry)[:5] == marks
        assert marks[0][1] == "wrong"  # a failing query's first result is wrong


@pytest.mark.parametrize("label", ["red", "crimson", "green"])
def test_failures_of_one_class(served, label):
    html = html_of(served["client"], f"/evaluation/failures?index=evaluated&label={label}")
    rows = failing_rows(served["results"], label).tolist()
    assert listed_rows(html) == rows
    if not rows:
        assert 'id="no-failures"' in html and f"No failing queries of class {label}." in html
    summary = {c.label: c for c in per_class(served["results"])}[label]
    assert f"{len(rows)} of the {summary.queries} queries of class\n        <strong>{label}</strong> fail" in html


def test_failing_rows_by_class_match_the_module_for_every_label():
    rng = np.random.default_rng(3)
    rows, labels = 500, 37
    results = QueryResults(
        query_item=np.arange(rows), query_path=np.zeros(0, "S1"), label=rng.integers(0, labels - 2, rows),
        label_names=np.array([f"l{i}" for i in range(labels)]), first_correct_rank=rng.choice([0, 1, 1, 2, 5], rows),
        relevant=np.ones(rows), ap_at_r=rng.random(rows), r_precision=rng.random(rows),
        top_ids=np.zeros((rows, 2)), top_scores=np.zeros((rows, 2)), depth=9, mode="leave-one-out",
        model_sha256="0" * 64, hist_edges=np.linspace(-1, 1, 3), hist_positive=np.zeros(2), hist_negative=np.zeros(2),
        hist_queries=rows,
    )  # fmt: skip
    loaded = LoadedQueries.of(results)
    np.testing.assert_array_equal(loaded.failing_of(None), failing_rows(results))
    for name in results.label_names:
        np.testing.assert_array_equal(loaded.failing_of(str(name)), failing_rows(results, str(name)))
    assert loaded.classes == per_class(results)


def test_a_querys_rank_list_marks_each_result_and_links_its_pair_view(served):
    results, gallery = served["results"], served["galleries"]["evaluated"]
    row = int(failing_rows(results)[0])
    query, label = int(results.query_item[row]), results.label_of(row)
    html = html_of(served["client"], f"/evaluation/query?index=evaluated&row={row}")
    assert f'id="query-image" src="/api/items/{query}/image?index=evaluated"' in html
    assert f'<span id="query-label">{label}</span>' in html
    assert f'id="first-correct">#{results.first_correct_rank[row]}' in html
    assert f'id="more-like-query" href="/?item={query}&amp;index=evaluated"' in html
    expected = [
        (int(item), "correct" if gallery.items[int(item)].label == label else "wrong") for item in results.top_ids[row]
    ]
    assert ranked_items(html) == expected and len(expected) == 10
    for rank, ((item, kind), score) in enumerate(zip(expected, results.top_scores[row]), start=1):
        entry = html[html.index(f'<li class="ranked {kind}" data-item="{item}">') :]
        entry = entry[: entry.index("</li>")]
        assert f'href="/pair?query_item={query}&amp;item={item}&amp;index=evaluated"' in entry
        assert f'src="/api/items/{item}/image?index=evaluated"' in entry
        assert f'<span class="rank">#{rank}</span>' in entry and f"{score:.3f}" in entry
        assert (
            ("✓" in entry and "correct</span>" in entry)
            if kind == "correct"
            else ("✗" in entry and "wrong</span>" in entry)
        )
        assert f'href="/?item={item}&amp;index=evaluated">More like this' in entry
        assert gallery.items[item].label in entry
    pair = served["client"].get(f"/api/pair?query_item={query}&item={expected[0][0]}&index=evaluated").get_json()
    assert pair["cosine"] == pytest.approx(float(results.top_scores[row, 0]), abs=1e-5)
    assert np.array(pair["query_cells"]).shape == (4, 4)


def test_query_pages_link_the_neighbouring_and_failing_rows(served):
    failing = failing_rows(served["results"]).tolist()
    html = html_of(served["client"], f"/evaluation/query?index=evaluated&row={failing[0]}")
    assert 'id="previous-failing"' not in html
    assert f'href="/evaluation/query?index=evaluated&amp;row={failing[1]}" id="next-failing"' in html
    html = html_of(served["client"], "/evaluation/query?index=evaluated&row=19")
    assert "Row 18" in html and "Row 20" not in html


def test_a_query_of_queries_mode_shows_its_path_and_no_pair_views(served):
    external = served["external"]
    row = int(failing_rows(external)[0]) if len(failing_rows(external)) else 0
    html = html_of(served["client"], f"/evaluation/query?index=external&row={row}")
    path = external.query_path[row].decode()
    assert f'id="query-path">Query image <code>{path}</code>' in html
    assert 'id="no-pair-views"' in html and "/pair?" not in html and 'id="query-image"' not in html
    assert ranked_items(html) and all(f"/?item={item}&amp;index=external" in html for item, _ in ranked_items(html))
    html = html_of(served["client"], "/evaluation/failures?index=external")
    assert listed_rows(html) == failing_rows(external).tolist() and "/pair?" not in html


def test_class_and_failure_lists_are_paginated(served):
    client = served["client"]
    html = html_of(client, "/evaluation/classes?index=many")
    assert html.count('<td class="class-label"') == 50 and "Page 1 of 3" in html
    assert 'rel="next" href="/evaluation/classes?index=many&amp;page=2"' in html and 'rel="prev"' not in html
    html = html_of(client, "/evaluation/classes?index=many&page=3")
    assert html.count('<td class="class-label"') == 20 and "<td>101</td>" in html and 'rel="next"' not in html
    failing = (np.arange(130) % 7 != 0).sum()
    pages = [listed_rows(html_of(client, f"/evaluation/failures?index=many&page={page}")) for page in (1, 2, 3)]
    assert [len(rows) for rows in pages] == [50, 50, failing - 100]
    assert sum(pages, []) == [row for row in range(130) if row % 7]
    html = html_of(client, "/evaluation/failures?index=many&label=class%20001")
    assert listed_rows(html) == [1, 121] and 'class="pagination"' not in html


def test_pages_build_only_the_rows_they_show(served, monkeypatch):
    module = importlib.import_module("webapp.eval_browser")  # the package's attribute is the blueprint
    built = []
    original = module.query_row
    monkeypatch.setattr(module, "query_row", lambda *args, **kw: built.append(args[1]) or original(*args, **kw))
    html_of(served["client"], "/evaluation/failures?index=many&page=2")
    assert len(built) == 50
    built.clear()
    html_of(served["client"], "/evaluation/query?index=many&row=77")
    assert built == [77]


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/evaluation/query?index=evaluated", 400, "parameter 'row' must be a query row of the evaluation (an integer from 0), got nothing"),
        ("/evaluation/query?index=evaluated&row=x", 400, "parameter 'row' must be a query row"),
        ("/evaluation/query?index=evaluated&row=-1", 400, "parameter 'row' must be a query row"),
        ("/evaluation/query?index=evaluated&row=20", 404, "no query row 20: the evaluation of gallery 'evaluated' has 20 rows"),
        ("/evaluation/query?index=nope&row=0", 404, "unknown index 'nope'"),
        ("/evaluation/failures?index=evaluated&label=purple", 404, "no evaluated query of gallery 'evaluated' has the label 'purple'"),
        ("/evaluation/failures?index=evaluated&page=0", 404, "no page 0: there is 1 page"),
        ("/evaluation/failures?index=evaluated&page=2", 404, "no page 2: there is 1 page"),
        ("/evaluation/classes?index=many&page=4", 404, "no page 4: there are 3 pages"),
        ("/evaluation/classes?index=many&page=two", 400, "parameter 'page' must be a page number (an integer from 0), got 'two'"),
        ("/evaluation/classes?index=nope", 404, "unknown index 'nope'"),
    ],
)  # fmt: skip
def test_bad_browser_parameters_are_error_pages(served, url, status, message):
    assert message in unescape(html_of(served["client"], url, status))


def test_similarity_histogram_is_a_png_with_an_etag(served):
    client = served["client"]
    response = client.get("/api/evaluation/similarities.png?index=evaluated")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert Image.open(io.BytesIO(response.data)).size[0] > 600
    etag = response.headers["ETag"]
    again = client.get("/api/evaluation/similarities.png?index=evaluated", headers={"If-None-Match": etag})
    assert again.status_code == 304
    for url in ("/api/evaluation/similarities.png?index=nope", "/api/evaluation/similarities.png?index=fresh"):
        response = client.get(url)
        assert response.status_code == 404 and response.get_json()["error"]


def _replace(folder: Path, content: bytes | QueryResults):
    path = folder / QUERY_RESULTS_FILE
    if isinstance(content, QueryResults):
        save_query_results(content, path)
    else:
        path.write_bytes(content)


def test_a_file_of_another_model_is_flagged_everywhere(served):
    import dataclasses

    folder = served["folders"]["bare"]
    _replace(folder, dataclasses.replace(served["results"], model_sha256="0" * 64))
    try:
        html = unescape(html_of(served["client"], "/evaluation?index=bare"))
        assert "were computed with model 000000000000, but gallery bare now uses model" in html
        assert "run `sct eval --index DIR` on its folder again" in html and 'id="failures-link"' not in html
        for url in (
            "/evaluation/failures?index=bare",
            "/evaluation/query?index=bare&row=0",
            "/evaluation/classes?index=bare",
        ):
            assert "were computed with model 000000000000" in unescape(html_of(served["client"], url, 409))
    finally:
        (folder / QUERY_RESULTS_FILE).unlink()


def test_an_unreadable_file_is_reported_without_its_path(served):
    folder = served["folders"]["bare"]
    _replace(folder, b"not an npz file")
    try:
        html = unescape(html_of(served["client"], "/evaluation?index=bare"))
        assert "eval_queries.npz of gallery 'bare' cannot be read (" in html and str(folder) not in html
        assert "run `sct eval --index DIR` again" in html
        page = unescape(html_of(served["client"], "/evaluation/failures?index=bare", 404))
        assert "cannot be read" in page and str(folder) not in page
        response = served["client"].get("/api/evaluation/similarities.png?index=bare")
        assert response.status_code == 404 and "cannot be read" in response.get_json()["error"]
    finally:
        (folder / QUERY_RESULTS_FILE).unlink()


def test_the_file_is_loaded_and_summarised_once_per_version(served, monkeypatch):
    import webapp.query_browser

    loads, summaries = [], []
    monkeypatch.setattr(webapp.query_browser, "load_query_results", lambda d: loads.append(d) or load_query_results(d))
    monkeypatch.setattr(webapp.query_browser, "per_class", lambda r: summaries.append(1) or per_class(r))
    folder = served["folders"]["bare"]
    _replace(folder, served["results"])
    try:
        client = served["client"]
        for url in ("/evaluation?index=bare", "/evaluation/failures?index=bare", "/evaluation/query?index=bare&row=3",
                    "/evaluation/classes?index=bare", "/api/evaluation/similarities.png?index=bare"):  # fmt: skip
            assert client.get(url).status_code == 200, url
        assert len(loads) == 1 and len(summaries) == 1
        _replace(folder, many_classes(served["galleries"]["bare"]))  # rebuilt: another file
        failing = (np.arange(130) % 7 != 0).sum()
        assert f"{failing} of 130 queries fail." in html_of(client, "/evaluation/failures?index=bare")
        assert len(loads) == 2 and len(summaries) == 2
        html_of(client, "/evaluation/failures?index=bare&page=2")
        assert len(loads) == 2
    finally:
        (folder / QUERY_RESULTS_FILE).unlink()
    assert 'id="no-query-results"' in html_of(served["client"], "/evaluation?index=bare")  # deleted: seen at once
