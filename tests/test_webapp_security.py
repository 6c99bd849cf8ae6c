"""Hardening of the web app: trusted Host names (DNS rebinding), security headers, no caching of query data,
the Recall@K picture drawn once per eval.json, bounded echoes of request values, no server paths in pages."""

from __future__ import annotations

import argparse
import json
import os
import socket
from html.parser import HTMLParser

import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from core.errors import UserError
from retrieval.embedder import OnnxEmbedder
from retrieval.evaluation import evaluate_gallery, save_eval
from retrieval.gallery import EVAL_FILE, Gallery
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import cli, create_app, evaluation
from webapp.security import TrustedHosts

LONG = "x" * 10_000
FIGURE = evaluation.Figure  # matplotlib's, counted in a test


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=2)
    folder = root / "index_data" / "colors"
    build_gallery_of(folder, model, paths, OnnxEmbedder(model))
    save_eval(evaluate_gallery(Gallery.load(folder), ks=(1, 2), progress=False), folder / EVAL_FILE)
    app = create_app([folder])
    return {"app": app, "client": app.test_client(), "root": root, "folder": folder}


def query_id(client) -> str:
    response = post_search(client, png_bytes(), k=2)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["query_id"]


# --- trusted hosts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "10.1.2.3", "localhost", "LocalHost.:80", "[::1]:8080", "[fe80::1]",
                                  socket.gethostname(), socket.getfqdn()])  # fmt: skip
def test_ip_addresses_localhost_and_the_machines_names_are_served(served, host):
    assert served["client"].get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("path", ["/", "/healthz", "/static/app.js", "/static//app.js", "/api//healthz", "/nowhere"])
def test_other_host_names_are_refused_before_routing_and_static_files(served, path):
    """A DNS rebinding page's requests name the attacker's domain: refused, and never redirected there."""
    response = served["client"].get(path, headers={"Host": "evil.example:5000"})
    assert response.status_code == 400 and "Location" not in response.headers
    text = response.get_data(as_text=True)
    assert "evil.example" in text and "--allowed-host" in text


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "1.2.3.4.5",
                                  "::1", "[::1", "[evil.example]", "", "a b", ":5000"])  # fmt: skip
def test_names_that_are_not_ip_addresses_or_known_are_not_trusted(host):
    assert host not in TrustedHosts()


def test_allowed_hosts_names_domains_and_any():
    trusted = TrustedHosts(["search.example.org", ".corp.example."])
    for host in ["search.example.org", "SEARCH.example.org.:8443", "corp.example", "a.b.corp.example"]:
        assert host in trusted, host
    for host in ["example.org", "evil-search.example.org", "search.example.org.evil", "evilcorp.example"]:
        assert host not in trusted, host
    assert "anything.example:81" in TrustedHosts(["*"])


def test_an_allowed_host_reaches_the_app_and_the_option_is_passed_by_sct_serve(served, capsys):
    app = create_app([served["folder"]], allowed_hosts=["search.example.org"])
    assert app.test_client().get("/healthz", headers={"Host": "search.example.org"}).status_code == 200
    assert served["client"].get("/healthz", headers={"Host": "search.example.org"}).status_code == 400

    parser = argparse.ArgumentParser(prog="sct")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--index", str(served["folder"]), "--allowed-host", "a.example",
                              "--allowed-host", "example.org:80"])  # fmt: skip
    with pytest.raises(UserError, match="'example.org:80'"):  # refused while loading, before serving anything
        args.func(args)


@pytest.mark.parametrize("entry", ["example.org:80", "http://example.org", "", ".", "exa mple.org"])
def test_an_allowed_host_must_be_a_name(entry):
    with pytest.raises(ValueError, match="without a port"):
        TrustedHosts([entry])


# --- headers ---------------------------------------------------------------------------------------------------


class InlineCode(HTMLParser):
    """What a page's Content-Security-Policy without 'unsafe-inline' would block: inline scripts and styles,
    style attributes, event handler attributes and javascript: URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "style" or (tag == "script" and "src" not in attributes):
            self.found.append(f"<{tag}>")
        for name, value in attrs:
            if name == "style" or name.startswith("on") or (value or "").strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value!r}>")


def test_pages_carry_a_content_security_policy_they_comply_with(served):
    client = served["client"]
    qid = query_id(client)
    for url in ["/", f"/pair?query={qid}&item=0", "/evaluation", "/pair?query=gone&item=0", "/nowhere"]:
        response = client.get(url)
        assert response.mimetype == "text/html"
        policy = response.headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe" not in policy, url
        assert "frame-ancestors 'none'" in policy
        parser = InlineCode()
        parser.feed(response.get_data(as_text=True))
        assert parser.found == [], url


def test_security_headers_on_every_response(served):
    client = served["client"]
    responses = [client.get("/"), client.get("/static/app.js"), client.get("/healthz"), client.get("/api/nowhere"),
                 client.get("/api/evaluation/recall.png"), post_search(client),
                 client.get("/", headers={"Host": "evil.example"})]  # fmt: skip
    for response in responses:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"


def test_a_views_own_policy_and_caching_are_kept(served):
    app = create_app([served["folder"]])

    @app.get("/api/search-like")
    def own_headers():
        return "<p>hi</p>", {"Content-Security-Policy": "sandbox", "Cache-Control": "max-age=60"}

    response = app.test_client().get("/api/search-like")
    assert response.headers["Content-Security-Policy"] == "sandbox"
    assert response.headers["Cache-Control"] == "max-age=60"
    assert response.headers["X-Frame-Options"] == "DENY"


def test_answers_with_query_data_are_not_stored(served):
    client = served["client"]
    search = post_search(client, png_bytes(), k=2)
    qid = search.get_json()["query_id"]
    answers = [search, post_search(client), post_search(client, png_bytes(), k=LONG)]  # errors too
    for path in ["/api/pair", "/api/heatmap", "/pair"]:
        answers += [client.get(f"{path}?query={qid}&item=1"), client.get(f"{path}?query=gone&item=1")]
    assert [answer.status_code for answer in answers] == [200, 400, 400, 200, 404, 200, 404, 200, 404]
    for answer in answers:
        assert answer.headers.get("Cache-Control") == "no-store", answer.request.path
    for other in [client.get("/"), client.get("/static/app.js"), client.get("/healthz")]:
        assert "no-store" not in other.headers.get("Cache-Control", "")


# --- Recall@K picture ------------------------------------------------------------------------------------------


def test_the_recall_curve_is_drawn_once_per_eval_json(served, monkeypatch):
    folder, client = served["folder"], served["client"]
    figures = []
    monkeypatch.setattr(evaluation, "Figure", lambda *args, **kwargs: figures.append(1) or FIGURE(*args, **kwargs))
    results = json.loads((folder / EVAL_FILE).read_text())

    def rewrite(recall_at_1: float) -> None:  # as `sct eval` does: a new file replaces the old
        (folder / "eval.json.new").write_text(json.dumps({**results, "recall@1": recall_at_1}))
        os.replace(folder / "eval.json.new", folder / EVAL_FILE)

    rewrite(0.25)
    first, second = (client.get("/api/evaluation/recall.png") for _ in range(2))
    assert first.status_code == second.status_code == 200 and first.data == second.data
    assert len(figures) == 1
    etag = first.headers["ETag"]
    assert "no-cache" in first.headers["Cache-Control"]
    unchanged = client.get("/api/evaluation/recall.png", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.data == b"" and len(figures) == 1

    rewrite(0.75)
    redrawn = client.get("/api/evaluation/recall.png", headers={"If-None-Match": etag})
    assert redrawn.status_code == 200 and redrawn.data != first.data and redrawn.headers["ETag"] != etag
    assert len(figures) == 2


# --- bounded echoes and server paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_of",
    [
        lambda client, qid: client.get(f"/api/pair?query={qid}&item={LONG}"),
        lambda client, qid: client.get(f"/api/heatmap?query={qid}&item=0&side={LONG}"),
        lambda client, qid: client.get(f"/api/heatmap?query={LONG}&item=0"),
        lambda client, qid: client.get(f"/api/pair?query={qid}&item=0&index={LONG}"),
        lambda client, qid: client.get(f"/api/evaluation/recall.png?index={LONG}"),
        lambda client, qid: post_search(client, png_bytes(), k=LONG),
        lambda client, qid: post_search(client, png_bytes(), index=LONG),
        lambda client, qid: client.get("/healthz", headers={"Host": LONG}),
    ],
)
def test_request_values_are_echoed_cut_short(served, request_of):
    response = request_of(served["client"], query_id(served["client"]))
    assert 400 <= response.status_code < 500
    assert len(response.data) < 1024 and "10,000 characters" in response.get_json()["error"]


def test_error_pages_echo_request_values_cut_short(served):
    html = served["client"].get(f"/pair?query={query_id(served['client'])}&item={LONG}").get_data(as_text=True)
    assert "10,000 characters" in html and "x" * 100 not in html


def test_the_evaluation_page_names_the_gallery_not_its_folder(served, tmp_path):
    client, folder = served["client"], served["folder"]
    fresh = tmp_path / "fresh"
    build_gallery_of(fresh, served["root"] / "model.onnx", sorted((served["root"] / "images").rglob("*.png")),
                     OnnxEmbedder(served["root"] / "model.onnx"))  # fmt: skip
    (fresh / EVAL_FILE).mkdir()  # unreadable: the error says why, without the path
    client = create_app([folder, fresh]).test_client()
    for name in ("colors", "fresh"):
        html = client.get(f"/evaluation?index={name}").get_data(as_text=True)
        assert f"Retrieval quality · {name}" in html
        assert str(served["root"]) not in html and str(tmp_path) not in html, name
    (fresh / EVAL_FILE).rmdir()
    html = client.get("/evaluation?index=fresh").get_data(as_text=True)
    assert "not been evaluated yet" in html and str(tmp_path) not in html
