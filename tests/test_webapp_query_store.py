"""The query store: bounds by bytes and age, damaged and hostile entries, concurrent writers, its settings."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import pytest

from core.errors import UserValueError
from tests.test_webapp_api import build_gallery_of, png_bytes, post_search
from webapp import cli, create_app
from webapp.query_store import QueryStore, default_query_store, query_id_of


def stored(store: QueryStore, data: bytes) -> str:
    query_id = query_id_of(data)
    store.put(query_id, data)
    time.sleep(0.02)  # file times are as coarse as the kernel's clock tick: keep the order of writes apart
    return query_id


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look written ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_entries_past_the_age_limit_are_not_read_and_are_swept(tmp_path):
    store = QueryStore(tmp_path, max_bytes=1 << 20, max_age_s=60)
    old = stored(store, b"old image")
    assert store.get(old) == b"old image"
    age(tmp_path / old, 61)
    assert store.get(old) is None and (tmp_path / old).exists()  # not read; removed at the next sweep
    fresh = stored(store, b"fresh image")
    store.sweep()
    assert sorted(path.name for path in tmp_path.iterdir()) == [fresh]
    age(tmp_path / fresh, 59)
    store.put(fresh, b"fresh image")  # searched again: its age restarts
    time.sleep(2)
    assert store.get(fresh) == b"fresh image"
    age(tmp_path / fresh, 61)
    store.sweep()
    assert list(tmp_path.iterdir()) == []


def test_the_oldest_entries_go_when_the_store_is_over_its_size(tmp_path):
    images = [bytes([number]) * 1000 for number in range(5)]
    store = QueryStore(tmp_path, max_bytes=2500, max_age_s=3600)  # two images fit; each write sweeps
    a, b, c = (stored(store, image) for image in images[:3])
    assert {path.name for path in tmp_path.iterdir()} == {b, c}
    assert store.get(a) is None and store.get(b) == images[1]
    stored(store, images[1])  # b searched again: now c is the oldest
    d = stored(store, images[3])
    assert {path.name for path in tmp_path.iterdir()} == {b, d}
    store.put(query_id_of(images[4] * 3), images[4] * 3)  # larger than the whole store: not stored
    assert {path.name for path in tmp_path.iterdir()} == {b, d}


def test_a_damaged_or_replaced_entry_is_a_miss_and_is_removed(tmp_path):
    store = QueryStore(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    first, second = stored(store, b"first image"), stored(store, b"second image")
    (tmp_path / first).write_bytes(b"first imagf")
    os.replace(tmp_path / second, tmp_path / f"{first}.x")
    (tmp_path / second).write_bytes(b"first image")  # another image under this id
    assert store.get(first) is None and store.get(second) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{first}.x"]


def test_interrupted_writes_are_swept_once_older_than_the_age_limit(tmp_path):
    store = QueryStore(tmp_path, max_bytes=1 << 20, max_age_s=60)
    litter = tmp_path / f".{'0' * 64}.tmp-1234"
    litter.write_bytes(b"half an image")
    store.sweep()
    assert litter.exists()  # perhaps a write under way
    age(litter, 61)
    store.sweep()
    assert not litter.exists()


HOSTILE_IDS = [
    "../x",
    "../" + "0" * 61,
    "..%2F..%2Fetc%2Fpasswd",
    "/etc/passwd",
    "0" * 65,
    "0" * 63,
    "a" * 10_000,
    "A" * 64,
    "g" * 64,
    "0" * 64 + "\n",
    " " + "0" * 63,
    "０" * 64,  # fullwidth digits: not ASCII
]


@pytest.mark.parametrize("query_id", HOSTILE_IDS)
def test_hostile_ids_are_refused_without_touching_the_file_system(tmp_path, query_id):
    store = QueryStore(tmp_path / "store", max_bytes=1 << 20, max_age_s=3600)
    with pytest.raises(ValueError, match="not a query id"):
        store.get(query_id)
    with pytest.raises(ValueError, match="not a query id"):
        store.put(query_id, b"x")
    assert list((tmp_path / "store").iterdir()) == []


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
    from retrieval.embedder import OnnxEmbedder

    root = tmp_path_factory.mktemp("store")
    model = make_tiny_model(root / "model.onnx")
    build_gallery_of(root / "colors", model, make_color_images(root / "images", per_class=2), OnnxEmbedder(model))
    return root / "colors"


@pytest.mark.parametrize("endpoint", ["/api/pair", "/api/heatmap", "/pair"])
def test_hostile_query_ids_get_a_clear_404_and_no_file_is_read(colors, tmp_path, monkeypatch, endpoint):
    store = tmp_path / "store"
    outside = tmp_path / ("0" * 64)  # a valid name, next to the store rather than in it
    outside.write_bytes(png_bytes())
    client = create_app([colors], query_store=store).test_client()
    reads = []
    monkeypatch.setattr(QueryStore, "get", lambda self, query_id: reads.append(query_id))
    for query_id in [*HOSTILE_IDS, "../" + "0" * 64, "..%2F" + "0" * 64]:
        response = client.get(endpoint, query_string={"query": query_id, "item": "0"})
        assert response.status_code == 404, query_id
        text = response.get_data(as_text=True)
        assert "64 hexadecimal" in text and "search again" in text
    assert reads == []


def test_a_store_that_cannot_be_written_leaves_the_query_to_its_worker(colors, tmp_path, monkeypatch, caplog):
    client = create_app([colors], query_store=tmp_path).test_client()

    def full(self, query_id, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(QueryStore, "put", full)
    with caplog.at_level(logging.WARNING, logger="webapp.pairs"):
        body = post_search(client, png_bytes(), k=2).get_json()
    assert "No space left on device" in caplog.text and body["query_id"] in caplog.text
    assert client.get(body["results"][0]["heatmap_url"]).status_code == 200  # from this worker's LRU
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_and_sweeps_keep_only_whole_entries_within_the_bound(tmp_path):
    images = [random.Random(number).randbytes(3000) for number in range(12)]
    stores = [QueryStore(tmp_path, max_bytes=20_000, max_age_s=3600) for _ in range(4)]  # four processes' views
    errors = []

    def write(store: QueryStore, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(40):
                data = rng.choice(images)
                store.put(query_id_of(data), data)
                store.get(query_id_of(rng.choice(images)))
        except Exception as error:  # noqa: BLE001 - any error fails the test below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(store, seed)) for seed, store in enumerate(stores * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stores[0].sweep()
    files = list(tmp_path.iterdir())
    assert files and sum(path.stat().st_size for path in files) <= 20_000
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name  # no partial or temporary file left


def test_a_store_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    os.chown(tmp_path, 65534, -1)
    with pytest.raises(UserValueError, match="belongs to another user"):
        QueryStore(tmp_path, max_bytes=1 << 20, max_age_s=3600)


def test_a_store_that_is_a_link_in_a_folder_anyone_can_write_is_refused(tmp_path):
    public, mine = tmp_path / "public", tmp_path / "mine"
    public.mkdir()
    mine.mkdir()
    public.chmod(0o1777)  # as /tmp
    (public / "queries").symlink_to(mine)
    with pytest.raises(UserValueError, match="symbolic link in a folder that anyone can write"):
        QueryStore(public / "queries", max_bytes=1 << 20, max_age_s=3600)
    public.chmod(0o755)
    QueryStore(public / "queries", max_bytes=1 << 20, max_age_s=3600)  # a link of the owner's own making


def test_servers_of_one_user_share_the_default_store(colors, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert default_query_store().parent == tmp_path and str(os.getuid()) in default_query_store().name
    first, second = (create_app([colors]).test_client() for _ in range(2))
    body = post_search(first, png_bytes(seed=3), k=2).get_json()
    assert (default_query_store() / body["query_id"]).exists()
    assert second.get(body["results"][0]["heatmap_url"]).status_code == 200


def test_sct_serve_passes_the_query_store_settings_to_each_app(monkeypatch, tmp_path):
    given = {}

    class Stop(Exception):
        pass

    def capture(index_dirs, **settings):
        given.update(settings)
        raise Stop

    monkeypatch.setattr(cli, "create_app", capture)
    parser = __import__("argparse").ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--index", "x", "--query-store", str(tmp_path), "--query-store-mb", "2", "--query-store-hours", "3"]
    )
    with pytest.raises(Stop):
        cli.serve(args)
    assert given["query_store"] == str(tmp_path)
    assert given["query_store_bytes"] == 2 << 20 and given["query_store_age_s"] == 3 * 3600
    defaults = parser.parse_args(["serve", "--index", "x"])
    assert (defaults.query_store, defaults.query_store_mb, defaults.query_store_hours) == (None, 256, 24)


@pytest.mark.parametrize("flag", ["--query-store-mb", "--query-store-hours"])
def test_non_positive_store_bounds_are_error_2(flag, capsys):
    from sct.cli import main

    assert main(["serve", "--index", "x", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_the_help_shows_an_example_of_a_shared_store(capsys):
    from sct.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--query-store /srv/sct-queries" in help_text
    assert f"(default:{default_query_store()})" in "".join(help_text.split())  # wrapped anywhere


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserValueError, match="query store"):
        QueryStore(tmp_path / "file", max_bytes=1, max_age_s=1)
    assert Path(tmp_path / "file").read_bytes() == b""
