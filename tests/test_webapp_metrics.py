"""``GET /metrics`` (request counts, stage latencies; thread-safe) and the bounded LRU cache behind query ids."""

from __future__ import annotations

import threading
import time

import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from retrieval.embedder import OnnxEmbedder
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import create_app
from webapp.cache import LruCache
from webapp.metrics import Metrics


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    model = make_tiny_model(root / "model.onnx")
    build_gallery_of(root / "colors", model, make_color_images(root / "images", per_class=2), OnnxEmbedder(model))
    return create_app([root / "colors"]).test_client()


def test_metrics_count_requests_by_endpoint_and_status_class_and_time_stages(client):
    for _ in range(3):
        assert post_search(client, png_bytes()).status_code == 200
    assert post_search(client, b"not an image").status_code == 400
    body = post_search(client, png_bytes()).get_json()
    assert client.get(body["results"][0]["heatmap_url"]).status_code == 200
    client.get("/api/nothing")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.mimetype == "application/json"
    body = metrics.get_json()
    assert body["requests"]["api.search"] == {"2xx": 4, "4xx": 1}
    assert body["requests"]["pair_api.heatmap"] == {"2xx": 1}
    assert body["requests"]["unmatched"] == {"4xx": 1}
    latency = body["latency"]
    assert latency["decode"]["count"] == 4  # the undecodable upload is not a decode time
    for stage in ("embed", "search", "render"):
        assert latency[stage]["count"] == latency[stage]["window"] == 4
    for stage in ("decode", "embed", "search", "render", "item_view", "heatmap"):
        stats = latency[stage]
        assert set(stats) == {"count", "window", "mean_ms", "p50_ms", "p99_ms"}
        assert 0 < stats["p50_ms"] <= stats["p99_ms"] and stats["mean_ms"] > 0, stage
    assert body["queries_kept"] == 1 and body["item_views_cached"] == 1  # one image searched 4 times: one query id
    time.sleep(0.3)
    assert client.get("/metrics").get_json()["uptime_s"] - body["uptime_s"] >= 0.2  # 0.3 s, each rounded to 0.1 s


def test_metrics_keep_a_bounded_window_and_count_from_many_threads():
    metrics = Metrics(window=50)

    def work(thread: int) -> None:
        for i in range(500):
            metrics.observe("embed", (thread * 500 + i) / 1000)
            metrics.count_request("api.search", 200 if i % 5 else 404)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == {"api.search": {"2xx": 3200, "4xx": 800}}
    embed = snapshot["latency"]["embed"]
    assert embed["count"] == 4000 and embed["window"] == 50


def test_percentiles_of_the_window():
    metrics = Metrics(window=100)
    for value in range(1, 201):  # only 101..200 ms stay in the window
        metrics.observe("search", value / 1000)
    stats = metrics.snapshot()["latency"]["search"]
    assert stats["mean_ms"] == pytest.approx(150.5) and stats["p50_ms"] == pytest.approx(150.5)
    assert stats["p99_ms"] == pytest.approx(199.01)


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
