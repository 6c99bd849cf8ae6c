"""Query ids across gunicorn workers and servers: every worker of a server, and a second server given the same
query store, answers the pairs and heatmaps of a search, also after every worker was replaced."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.load_test import Client, Server, build_color_gallery, running_server
from catalog import decode_rgb
from retrieval.embedder import OnnxEmbedder
from tests.test_webapp_api import png_bytes

REQUESTS = 30


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    model, embeddings, _ = build_color_gallery(root, root / "colors", per_class=3)
    store = ["--query-store", str(root / "queries")]
    with (
        running_server([root / "colors"], workers=3, threads=1, log_dir=root, extra_args=store) as three,
        running_server([root / "colors"], workers=1, threads=1, log_dir=root, extra_args=store) as other,
    ):
        yield {"three": three, "other": other, "model": model, "embeddings": embeddings}


def search(server: Server, data: bytes) -> dict:
    form = search_form(data, k="4")
    status, _, body = Client(server).post("/api/search", form.body, form.content_type)
    assert status == 200, body
    return json.loads(body)


def fetch_all(server: Server, paths: list[str]) -> list[tuple[int, bytes]]:
    """GET each path on a new connection, six at a time, so that they land on several workers."""

    def get(path: str) -> tuple[int, bytes]:
        try:
            return Client(server).get(path)
        except OSError as error:  # an HTTP error status: its code, and the JSON error
            return getattr(error, "code", 0), getattr(error, "read", bytes)()

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(get, paths))


def pair_paths(body: dict) -> list[str]:
    """Pair JSON, both heatmaps and the pair page of each result, repeated up to REQUESTS paths."""
    per_result = []
    for result in body["results"]:
        heatmap = result["heatmap_url"]
        per_result += [heatmap.replace("/api/heatmap", "/api/pair"), heatmap, f"{heatmap}&side=query"]
        per_result.append(result["pair_url"])
    return [per_result[number % len(per_result)] for number in range(REQUESTS)]


def answers_by_path(server: Server, paths: list[str]) -> dict[str, bytes]:
    answers = fetch_all(server, paths)
    failed = [(path, status, body[:200]) for path, (status, body) in zip(paths, answers) if status != 200]
    assert failed == [], server.log_tail()
    by_path: dict[str, bytes] = {}
    for path, (_, body) in zip(paths, answers):
        assert by_path.setdefault(path, body) == body, path  # the same answer from every worker
    return by_path


def worker_pids(server: Server) -> set[int]:
    return set(server.pids()[1:])


def test_every_worker_answers_the_pairs_of_a_search_also_after_all_were_replaced(servers):
    server = servers["three"]
    body = search(server, png_bytes(seed=7))
    paths = pair_paths(body)
    before = answers_by_path(server, paths)
    old = worker_pids(server)
    assert len(old) == 3
    for pid in old:  # none of the workers that will answer ran the search
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (len(worker_pids(server)) == 3 and not worker_pids(server) & old):
        time.sleep(0.2)
    assert len(worker_pids(server)) == 3 and not worker_pids(server) & old, server.log_tail()
    after = answers_by_path(server, paths)
    assert after == before


def test_a_second_server_sharing_the_store_answers_as_the_first(servers):
    data = png_bytes(seed=8)
    body = search(servers["other"], data)
    paths = pair_paths(body)
    here, there = answers_by_path(servers["three"], paths), answers_by_path(servers["other"], paths)
    assert here == there
    embedder = OnnxEmbedder(servers["model"])  # the cosine computed here, apart from the servers
    query = embedder.embed_images([decode_rgb(data, min_side=embedder.preprocessing.decode_side)])[0]
    for result in body["results"]:
        pair = json.loads(here[result["heatmap_url"].replace("/api/heatmap", "/api/pair")])
        cosine = float(servers["embeddings"][result["id"]] @ query)
        assert pair["cosine"] == pytest.approx(cosine, abs=1e-5)
        assert np.sum(pair["query_cells"]) == pytest.approx(cosine, abs=1e-5)
        assert np.sum(pair["item_cells"]) == pytest.approx(cosine, abs=1e-5)
    status, page = Client(servers["three"]).get(body["results"][0]["pair_url"])
    assert status == 200 and b'id="pair-cosine"' in page
