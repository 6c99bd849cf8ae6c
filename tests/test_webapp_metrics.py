"""``GET /metrics`` in Prometheus's text format (request counts, request and stage latency histograms, cache sizes),
summed over gunicorn's workers; and the bounded LRU cache behind query ids.

The output is read with prometheus_client's own parser, not by matching text."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from benchmarks.load_test import running_server
from retrieval.embedder import OnnxEmbedder
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import create_app
from webapp.cache import LruCache
from webapp.metrics import LATENCY_BUCKETS_S, Metrics

STAGES = ("decode", "embed", "search", "render", "item_view", "heatmap")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition: (name, labels) → value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"sample {key} twice"
            found[key] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 for one not there (a counter or histogram never touched)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def scrape(client) -> dict:
    """The samples of a test client's ``GET /metrics``."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return samples(response.get_data(as_text=True))


def exposed(metrics: Metrics) -> dict:
    """The samples ``metrics`` would answer ``GET /metrics`` with."""
    return samples(metrics.exposition()[0].decode())


def stage_count(found: dict, stage: str) -> float:
    """How many times ``stage`` was timed."""
    return value(found, "sct_stage_duration_seconds_count", stage=stage)


def check_histogram(found: dict, name: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of one histogram, after checking its buckets: cumulative, ending at +Inf with the count."""
    bounds = [*(f"{float(bound)}" for bound in LATENCY_BUCKETS_S), "+Inf"]
    buckets = [value(found, name + "_bucket", **labels, le=bound) for bound in bounds]
    count, total = value(found, name + "_count", **labels), value(found, name + "_sum", **labels)
    assert buckets == sorted(buckets) and buckets[-1] == count, (name, labels, buckets, count)
    assert (count == 0) == (total == 0) and total >= 0, (name, labels, count, total)
    return count, total


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    model = make_tiny_model(root / "model.onnx")
    build_gallery_of(root / "colors", model, make_color_images(root / "images", per_class=2), OnnxEmbedder(model))
    return root / "colors"


def test_metrics_count_requests_by_endpoint_and_code_and_time_requests_and_stages(gallery):
    client = create_app([gallery]).test_client()
    for _ in range(3):
        assert post_search(client, png_bytes()).status_code == 200
    assert post_search(client, b"not an image").status_code == 400
    body = post_search(client, png_bytes()).get_json()
    assert client.get(body["results"][0]["heatmap_url"]).status_code == 200
    assert client.get("/api/nothing").status_code == 404
    found = scrape(client)
    assert value(found, "sct_requests_total", endpoint="api.search", code="200") == 4
    assert value(found, "sct_requests_total", endpoint="api.search", code="400") == 1
    assert value(found, "sct_requests_total", endpoint="pair_api.heatmap", code="200") == 1
    assert value(found, "sct_requests_total", endpoint="unmatched", code="404") == 1
    assert value(found, "sct_requests_total", endpoint="api.metrics", code="200") == 0  # counted after its answer
    counts = {stage: check_histogram(found, "sct_stage_duration_seconds", stage=stage)[0] for stage in STAGES}
    # the undecodable upload is not a decode time; the heatmap embedded the result's item once
    assert counts == {"decode": 4, "embed": 4, "search": 4, "render": 4, "item_view": 1, "heatmap": 1}
    search_count, search_seconds = check_histogram(found, "sct_request_duration_seconds", endpoint="api.search")
    assert search_count == 5
    stage_seconds = sum(
        check_histogram(found, "sct_stage_duration_seconds", stage=stage)[1]
        for stage in ("decode", "embed", "search", "render")
    )
    assert 0 < stage_seconds <= search_seconds  # the stages of the searches are parts of their requests
    # one image searched 4 times: one query id
    assert value(found, "sct_queries_kept") == 1 and value(found, "sct_item_views_cached") == 1
    again = scrape(client)
    assert value(again, "sct_requests_total", endpoint="api.metrics", code="200") == 1
    assert value(again, "sct_request_duration_seconds_count", endpoint="api.metrics") == 1


def test_each_app_counts_its_own_requests(gallery):
    """Without PROMETHEUS_MULTIPROC_DIR, every app (and so every test client) has a registry of its own."""
    first, second = create_app([gallery]).test_client(), create_app([gallery]).test_client()
    assert first.get("/healthz").status_code == 200
    assert value(scrape(first), "sct_requests_total", endpoint="api.healthz", code="200") == 1
    assert value(scrape(second), "sct_requests_total", endpoint="api.healthz", code="200") == 0


def test_metrics_count_and_bucket_every_observation_from_many_threads():
    metrics = Metrics()

    def work(thread: int) -> None:
        for i in range(500):
            metrics.observe("embed", (thread * 500 + i) / 100_000)
            metrics.count_request("api.search", 200 if i % 5 else 404)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    observed = np.arange(8 * 500) / 100_000
    assert metrics.exposition()[1].startswith("text/plain")
    found = exposed(metrics)
    assert value(found, "sct_requests_total", endpoint="api.search", code="200") == 3200
    assert value(found, "sct_requests_total", endpoint="api.search", code="404") == 800
    count, total = check_histogram(found, "sct_stage_duration_seconds", stage="embed")
    assert count == 4000 and total == pytest.approx(observed.sum())
    for bound in LATENCY_BUCKETS_S:
        le = f"{float(bound)}"
        assert value(found, "sct_stage_duration_seconds_bucket", stage="embed", le=le) == np.sum(observed <= bound)


def test_a_failed_block_is_not_observed_and_timings_get_seconds():
    metrics, timings = Metrics(), {}
    with metrics.timed("render", timings):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), metrics.timed("render", timings):
        raise RuntimeError("no render")
    found = exposed(metrics)
    count, total = check_histogram(found, "sct_stage_duration_seconds", stage="render")
    assert count == 1 and total == pytest.approx(timings["render"]) and 0.01 <= timings["render"] < 1


def test_a_multiprocess_dir_that_is_not_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR=.*missing.* is not a folder"):
        Metrics()


# --- the real server: three gunicorn workers ------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    """One GET on a connection of its own (so that any worker may accept it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _post_search(port: int, image: bytes) -> int:
    form = search_form(image)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/api/search", body=form.body, headers={"Content-Type": form.content_type})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _per_worker(folder: Path, name: str, **labels: str) -> dict[int, float]:
    """Sample ``name`` of each worker, read from its own files in the server's metrics folder."""
    by_pid = {}
    for path in folder.glob("*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        found = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in MultiProcessCollector.merge([str(path)], accumulate=True)
            for sample in family.samples
        }
        if (name, frozenset(labels.items())) in found:
            by_pid[pid] = by_pid.get(pid, 0) + found[name, frozenset(labels.items())]
    return by_pid


def test_gunicorn_workers_report_the_sums_over_all_workers(gallery, tmp_path, monkeypatch):
    """3 workers answer requests on fresh connections; /metrics, whichever worker answers, reports every request,
    also after a worker is killed (its counts stay, its cache sizes go); the metrics folder goes with the server."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the server makes its metrics folder
    searches = 6
    images = [png_bytes(seed=seed) for seed in range(searches)]  # 6 queries kept: each image is one query id
    with running_server([gallery], workers=3, threads=1, log_dir=tmp_path) as server:
        (folder,) = tmp_path.glob("sct-metrics-*")

        def answered_by(endpoint: str) -> dict[int, float]:
            """The requests to ``endpoint`` that each worker answered (200), by pid."""
            return _per_worker(folder, "sct_requests_total", endpoint=endpoint, code="200")

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(lambda image: _post_search(server.port, image), images)) == [200] * searches
            sent = 0  # /healthz requests, in batches until at least two workers have answered some
            while sent < 600 and len(answered_by("api.healthz")) < 2:
                assert set(pool.map(lambda _: _get(server.port, "/healthz")[0], range(60))) == {200}
                sent += 60
        healthz_by_worker = answered_by("api.healthz")
        assert len(healthz_by_worker) >= 2, f"one worker answered all {sent} requests: {healthz_by_worker}"
        # The healthz requests of the fixture's start-up check count too: at least one, before the ones sent.
        started = sum(healthz_by_worker.values()) - sent
        assert started >= 1

        def check(found: dict, scrapes_before: int, queries: float) -> None:
            assert value(found, "sct_requests_total", endpoint="api.healthz", code="200") == sent + started
            assert value(found, "sct_requests_total", endpoint="api.search", code="200") == searches
            assert value(found, "sct_requests_total", endpoint="api.metrics", code="200") == scrapes_before
            assert check_histogram(found, "sct_request_duration_seconds", endpoint="api.search")[0] == searches
            for stage in ("decode", "embed", "search", "render"):
                assert check_histogram(found, "sct_stage_duration_seconds", stage=stage)[0] == searches, stage
            assert value(found, "sct_queries_kept") == queries

        scrapes = 0
        while scrapes < 60 and len(answered_by("api.metrics")) < 3:
            status, text = _get(server.port, "/metrics")
            assert status == 200
            check(samples(text), scrapes, searches)
            scrapes += 1
        assert len(answered_by("api.metrics")) >= 2, f"one worker answered all {scrapes} scrapes"

        kept = _per_worker(folder, "sct_queries_kept")
        victim = max(kept, key=kept.get)
        assert kept[victim] > 0 and victim in server.pids()[1:]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (folder / f"gauge_livesum_{victim}.db").exists():  # gunicorn's child_exit hook removes it
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        for _ in range(6):
            status, text = _get(server.port, "/metrics")
            check(samples(text), scrapes, searches - kept[victim])
            scrapes += 1
        # Stop once gunicorn's new worker serves: one stopped while booting holds the master for its timeout.
        while len(set(server.pids()[1:]) & set(answered_by("api.healthz"))) < 3:
            assert time.monotonic() < deadline + 30, server.log_tail()
            _get(server.port, "/healthz")
    assert not folder.exists()


def test_lru_cache_evicts_the_least_recently_used_and_expires_entries():
    now = [0.0]
    cache: LruCache[str, int] = LruCache(capacity=2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0
    with pytest.raises(ValueError):
        LruCache(capacity=0, ttl_s=1)
