"""The real server under load (issue 9): ``python -m sct serve`` (gunicorn) on 127.0.0.1 serves 300 searches
from 4 threads without an error or a wrong ranking and without growing; a gallery rebuilt by ``sct index``
while searches run is swapped in without a failed request; the server binds the loopback address only, and
stops promptly. The long variant is benchmarks/load_test.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.fixtures.tiny_onnx import make_color_images
from benchmarks.load_test import Client, build_color_gallery, queries_for, run_load, running_server
from catalog import decode_rgb
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import Gallery
from retrieval.image_folder import list_image_folder

ROOT = Path(__file__).resolve().parents[1]
K = 5
NEW_CLASSES = {"cyan": (30, 200, 210), "magenta": (200, 30, 200), "yellow": (220, 210, 30)}
ADDED_CLASSES = {"orange": (240, 140, 20), "violet": (120, 40, 220)}
RSS_GROWTH_LIMIT_MIB = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    model, embeddings, labels = build_color_gallery(root, root / "colors", per_class=8)
    queries = queries_for(model, embeddings, labels, K)
    with running_server([root / "colors"], workers=1, threads=4, log_dir=root) as server:
        yield {"root": root, "model": model, "server": server, "queries": queries, "labels": labels}


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


def test_the_server_listens_on_the_loopback_address_only(setup):
    assert listening_addresses(setup["server"].port) == ["0100007F"]  # 127.0.0.1, little-endian hex


def test_300_searches_from_4_threads_no_error_and_flat_memory(setup):
    server = setup["server"]
    run_load(server, setup["queries"], threads=4, duration_s=30, max_requests=40, k=K)  # warm-up
    rss_before = server.rss_kib() / 1024
    result = run_load(server, setup["queries"], threads=4, duration_s=60, max_requests=300, k=K)
    rss_after = server.rss_kib() / 1024
    first, last = result.rss_thirds_mib()
    print(
        f"\n{result.requests} requests in {result.wall_s:.2f} s ({result.requests_per_s:.0f}/s), "
        f"p50 {result.percentile_ms(50):.1f} ms, p99 {result.percentile_ms(99):.1f} ms, "
        f"server RSS {rss_before:.1f} → {rss_after:.1f} MiB (thirds {first:.1f} → {last:.1f})"
    )
    assert result.errors == []
    assert result.requests == 300 and result.statuses == {200: 300}
    assert last - first < RSS_GROWTH_LIMIT_MIB and rss_after - rss_before < RSS_GROWTH_LIMIT_MIB


@pytest.mark.parametrize("content_type", ["image/png", "application/json", "multipart/form-data"])
def test_a_refused_body_leaves_the_keep_alive_connection_usable(setup, content_type):
    """A 200 kB body refused unread (no multipart form, so no file field 'image'), then a good search on the
    same connection. gunicorn drains at most 64 kB of an unread body and otherwise closes the connection it
    announced as keep-alive; webapp.errors.drain_refused_bodies reads the rest first."""
    client = Client(setup["server"])
    status, _, body = client.post("/api/search", bytes(200_000), content_type)
    assert status == 400 and b"missing file field 'image'" in body
    assert client._connection is not None  # still open on our side
    query = setup["queries"][0]
    request = search_form(query.image, k=str(K))
    status, _, body = client.post("/api/search", request.body, request.content_type)
    assert status == 200 and [r["id"] for r in json.loads(body)["results"]] == query.expected_ids
    client.close()


def test_a_gallery_rebuilt_by_sct_index_under_load_is_swapped_in_without_a_failure(setup):
    """``sct index`` rebuilds the served folder with other classes while 4 threads search. Every answer must
    be the exact brute-force ranking of either the old or the new gallery (never a mix), and every search
    sent a second after ``sct index`` returned must see the new one."""
    root, queries = setup["root"], setup["queries"]
    new_images = root / "new-images"
    make_color_images(new_images, classes=NEW_CLASSES, per_class=5, seed=3)
    new_sources = list_image_folder(new_images)  # the order `sct index --images` gives its items
    new_embeddings = OnnxEmbedder(setup["model"]).embed_paths([p for p, _ in new_sources], progress=False).embeddings
    old_labels, new_labels = setup["labels"], [label for _, label in new_sources]
    versions = [
        (np.arange(len(old_labels)), None, old_labels),
        (np.arange(len(new_labels)), new_embeddings, new_labels),
    ]
    old_or_new = one_of_the_versions(setup, versions, [query.expected_ids for query in queries])
    result, (rebuilding, swapped), (index,) = searches_while(
        {**setup, "check": old_or_new},
        [["index", "--model", str(setup["model"]), "--images", str(new_images), "--out", str(root / "colors")]],
    )
    assert index.returncode == 0, index.stderr
    assert result.errors == [] and set(result.statuses) == {200}, result.errors[:5]
    new_label_set = set(NEW_CLASSES)
    before = [answer for sent, answer in result.answers if sent < rebuilding]
    after = [answer for sent, answer in result.answers if sent > swapped + 1.0]
    is_new = [set(r["label"] for r in answer["results"]) <= new_label_set for answer in after]
    print(
        f"\n{result.requests} searches, none failed; `sct index` took {swapped - rebuilding:.1f} s; "
        f"{len(after)} sent a second after it returned, {sum(is_new)} of them answered from the new gallery"
    )
    assert after and all(is_new)
    assert before and not any(set(r["label"] for r in answer["results"]) & new_label_set for answer in before)
    status, body = Client(setup["server"]).get("/healthz")
    assert status == 200 and json.loads(body)["indexes"][0]["count"] == len(new_labels)


def one_of_the_versions(setup, versions, first_rankings=None):
    """A load check accepting exactly the brute-force top K of one of ``versions``: (item ids, their vectors,
    their labels) of each version of the served gallery. ``first_rankings`` (per query) stands in for the first
    version's when its vectors are None."""
    embedder = OnnxEmbedder(setup["model"])
    expected = {}
    for number, query in enumerate(setup["queries"]):
        vector = embedder.embed_images([decode_rgb(query.image, min_side=embedder.preprocessing.decode_side)])[0]
        rankings = []
        for ids, vectors, labels in versions:
            if vectors is None:
                rows = np.searchsorted(ids, first_rankings[number])
            else:
                rows = np.argsort(-(vectors @ vector), kind="stable")[:K]
            rankings.append(([int(ids[row]) for row in rows], [labels[row] for row in rows]))
        expected[query.image] = rankings

    def check(query, answer) -> str | None:
        got = ([r["id"] for r in answer["results"]], [r["label"] for r in answer["results"]])
        if got in expected[query.image]:
            # (when, the last version that ranks so): versions can share a query's ranking
            matched.append((time.monotonic(), max(i for i, r in enumerate(expected[query.image]) if r == got)))
            return None
        return f"ids and labels {got}: none of the versions' rankings {expected[query.image]}"

    matched: list[tuple[float, int]] = []
    check.matched = matched
    return check


def searches_while(setup, commands: list[list[str]]) -> tuple[object, list[float], list[subprocess.CompletedProcess]]:
    """Run the ``sct`` commands one after the other while 4 threads search; returns the load result, the times
    each command started and the last one returned, and the commands' outcomes."""
    stop, outcome, times, runs = threading.Event(), {}, [], []
    load = threading.Thread(
        target=lambda: outcome.setdefault(
            "result",
            run_load(
                setup["server"],
                setup["queries"],
                threads=4,
                duration_s=120,
                max_requests=10**6,
                k=K,
                check=setup["check"],
                keep_answers=True,
                stop=stop,
            ),
        )
    )
    load.start()
    try:
        time.sleep(0.7)
        for command in commands:
            times.append(time.monotonic())
            runs.append(
                subprocess.run(
                    [sys.executable, "-m", "sct", *command], capture_output=True, text=True, cwd=ROOT, timeout=120
                )
            )
        times.append(time.monotonic())
        time.sleep(2.0)
    finally:
        stop.set()
        load.join()
    return outcome["result"], times, runs


def test_adds_and_removes_under_load_are_swapped_in_without_a_failure(setup):
    """``sct index --add`` then ``--remove`` change the served folder while 4 threads search. Every answer is the
    exact brute-force ranking of one of its three versions, never a mix, and every search sent a second after the
    removal returned sees the last version."""
    folder = setup["root"] / "colors"
    served = Gallery.load(folder)  # whichever version the tests above left
    ids, vectors, labels = served.items.ids, served.vectors()[:], [item.label for item in served.items]
    added_images = setup["root"] / "added-images"
    make_color_images(added_images, classes=ADDED_CLASSES, per_class=4, seed=5)
    added = list_image_folder(added_images)
    added_vectors = OnnxEmbedder(setup["model"]).embed_paths([p for p, _ in added], progress=False).embeddings
    first = int(served.manifest.get("next_id", len(ids)))
    grown = (
        np.concatenate([ids, np.arange(first, first + len(added))]),
        np.concatenate([vectors, added_vectors]),
        labels + [label for _, label in added],
    )
    removed = [int(ids[0]), int(ids[3]), first]  # two old items and the first added one
    keep = ~np.isin(grown[0], removed)
    last = (grown[0][keep], grown[1][keep], [label for label, kept in zip(grown[2], keep) if kept])
    check = one_of_the_versions(setup, [(ids, vectors, labels), grown, last])
    result, times, runs = searches_while(
        {**setup, "check": check},
        [
            ["index", "--add", "--images", str(added_images), "--out", str(folder)],
            ["index", "--remove", *map(str, removed), "--out", str(folder)],
        ],
    )
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert result.errors == [] and set(result.statuses) == {200}, result.errors[:5]
    during = [version for when, version in check.matched if times[0] < when < times[-1]]
    after = [version for when, version in check.matched if when > times[-1] + 1.0]
    print(
        f"\n{result.requests} searches while `sct index` added and removed ({times[-1] - times[0]:.1f} s), none "
        f"failed; answered from versions {sorted(set(during))} meanwhile, {len(after)} after, all from the last"
    )
    assert after and set(after) == {2}
    status, body = Client(setup["server"]).get("/healthz")
    assert status == 200 and json.loads(body)["indexes"][0]["count"] == len(last[0])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_server_stops_promptly_after_serving(tmp_path, stop_signal):
    """Workers hung at exit (in ONNX Runtime's exit handlers, or in gunicorn's threaded worker's quit handler),
    and stopping took gunicorn's graceful timeout; workers now leave through webapp.server's exit hook."""
    build_color_gallery(tmp_path, tmp_path / "colors", per_class=2)
    with running_server([tmp_path / "colors"], log_dir=tmp_path) as server:
        workers = server.pids()[1:]
        client = Client(server)
        request = search_form(b"not an image", k="2")
        for _ in range(3):
            assert client.post("/api/search", request.body, request.content_type)[0] == 400
        client.close()  # the keep-alive connection becomes readable in the worker as the signal arrives
        started = time.monotonic()
        server.process.send_signal(stop_signal)
        server.process.wait(timeout=25)
        stopped_after = time.monotonic() - started
    assert workers and stopped_after < 10, f"stopping took {stopped_after:.1f} s:\n{server.log_tail()}"
    assert not any(
        Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in workers
    )
