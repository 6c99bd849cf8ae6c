"""Adding to and removing from a gallery in place, and filtered search, checked against brute force over the
vectors that should be there."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import retrieval.gallery as gallery_module
from benchmarks.fixtures.tiny_onnx import make_tiny_model
from core.errors import UserValueError
from retrieval.evaluation import evaluate_gallery
from retrieval.filters import SearchFilter, parse_id_list, parse_id_range
from retrieval.gallery import REMOVED_FILE, Gallery, GalleryItem, build_gallery
from retrieval.gallery_update import add_items, remove_items

DIM, COUNT = 8, 300
#: ivf types search every list (nprobe = nlist), so that they are exact and comparable with brute force
EXACT_OPTIONS = {"flat": {}, "ivf-flat": {"nlist": 6, "nprobe": 6}, "hnsw": {}}


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def sources(count: int, prefix: str) -> list[tuple[str, str, None]]:
    return [(f"/data/{prefix}/{i}.jpg", f"class {i % 7}", None) for i in range(count)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx", dim=DIM)


def build(directory: Path, model: Path, vectors: np.ndarray, index_type: str = "flat", **options) -> Path:
    items = [GalleryItem(i, *source) for i, source in enumerate(sources(len(vectors), "old"))]
    return build_gallery(
        directory, vectors, items, model, dataset="synthetic", split="test", index_type=index_type, **options
    )


def changed_gallery(tmp_path: Path, model: Path, index_type: str, **options):
    """Build 300 items, remove 3 (the last among them), add 40, remove the first added one. Returns the folder,
    and the ids and vectors that should be there, in row order."""
    old, new = unit_vectors(COUNT, seed=0), unit_vectors(40, seed=1)
    directory = build(tmp_path / "g", model, old, index_type, **options)
    assert remove_items(directory, [17, 5, COUNT - 1]) == 3
    added = add_items(directory, new, sources(40, "new"), image_root="/data", note="new images")
    assert added == list(range(COUNT, COUNT + 40))  # after the highest id ever given, removed ones included
    assert remove_items(directory, [COUNT]) == 1
    keep_old = np.setdiff1d(np.arange(COUNT), [5, 17, COUNT - 1])
    ids = np.concatenate([keep_old, np.arange(COUNT + 1, COUNT + 40)])
    vectors = np.concatenate([old[keep_old], new[1:]])
    return directory, ids, vectors


def brute_force(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    similarities = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    return ids[np.argsort(-similarities, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("index_type", EXACT_OPTIONS)
def test_adds_and_removes_search_like_brute_force_over_what_is_left(tmp_path, model, index_type):
    directory, ids, vectors = changed_gallery(tmp_path, model, index_type, **EXACT_OPTIONS[index_type])
    gallery = Gallery.load(directory)
    assert gallery.items.ids.tolist() == ids.tolist()
    assert gallery.item(COUNT + 5).path == "/data/new/5.jpg" and gallery.item(16).path == "/data/old/16.jpg"
    assert not gallery.has_item(17) and not gallery.has_item(COUNT)
    assert np.array_equal(gallery.vectors()[:], vectors)  # every vector kept, none embedded or moved
    assert np.array_equal(gallery.vectors_of(ids[::-7]), vectors[::-7])
    queries = unit_vectors(20, seed=2)
    scores, found = gallery.search(queries, 10)
    expected = brute_force(queries, ids, vectors, 10)
    if index_type == "hnsw":  # approximate, but never a removed id
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found.tolist(), expected.tolist())]) >= 0.95
        assert not set(found.ravel().tolist()) & {5, 17, COUNT - 1, COUNT}
        assert sorted(np.load(directory / REMOVED_FILE).tolist()) == [5, 17, COUNT - 1, COUNT]
    else:
        assert found.tolist() == expected.tolist()
        assert not (directory / REMOVED_FILE).exists()
    rows = gallery.items.rows_of(found.ravel()).reshape(found.shape)
    assert np.allclose(scores, np.einsum("md,mkd->mk", queries, vectors[rows]), atol=1e-5)
    assert gallery.search(queries, 1000)[1].shape == (20, len(ids))


def test_the_manifest_keeps_the_history_and_ids_are_never_reused(tmp_path, model):
    directory, ids, _ = changed_gallery(tmp_path, model, "flat")
    manifest = json.loads((directory / "manifest.json").read_text())
    changes = [(entry["change"], entry["count"]) for entry in manifest["history"]]
    assert changes == [("build", COUNT), ("remove", COUNT - 3), ("add", COUNT + 37), ("remove", COUNT + 36)]
    assert manifest["history"][1]["ids"] == [5, 17, COUNT - 1]
    assert manifest["history"][2]["id_range"] == [COUNT, COUNT + 40] and manifest["history"][2]["source"]
    assert manifest["count"] == len(ids) and manifest["next_id"] == COUNT + 40 and manifest["format_version"] == 3
    assert add_items(directory, unit_vectors(2, seed=9), sources(2, "more"), image_root="/data", note="x") == [
        COUNT + 40,
        COUNT + 41,
    ]


@pytest.mark.parametrize("index_type,options", [("ivf-flat", {"nlist": 6}), ("hnsw", {}), ("ivf-pq", {"nlist": 4})])
def test_approximate_indexes_record_their_recall_after_a_change(tmp_path, model, index_type, options):
    directory, ids, _ = changed_gallery(tmp_path, model, index_type, **options)
    manifest = Gallery.load(directory).manifest
    assert 0.5 <= manifest["recall_at_10_vs_exact"] <= 1.0 and manifest["count"] == len(ids)


def test_leave_one_out_evaluation_equals_a_fresh_build_of_the_same_images(tmp_path, model):
    directory, ids, vectors = changed_gallery(tmp_path, model, "flat")
    changed = Gallery.load(directory)
    fresh_items = [GalleryItem(row, item.path, item.label) for row, item in enumerate(changed.items)]
    fresh = Gallery.load(
        build_gallery(tmp_path / "fresh", vectors, fresh_items, model, dataset="synthetic", split="test")
    )
    (ours, our_queries), (theirs, their_queries) = (evaluate_gallery(g, per_query_top=5) for g in (changed, fresh))
    drop = {"created": None, "gallery": None}
    assert ours | drop == theirs | drop and ours["queries"] == len(ids)
    # the per-query file names items by id: the changed gallery's ids of the fresh one's rows
    assert np.array_equal(our_queries.query_item, ids[their_queries.query_item])
    assert np.array_equal(our_queries.top_ids, np.where(their_queries.top_ids >= 0, ids[their_queries.top_ids], -1))


def test_a_refused_change_leaves_the_folder_as_it_was(tmp_path, model):
    directory = build(tmp_path / "g", model, unit_vectors(20, seed=0))
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    with pytest.raises(UserValueError, match=r"has no item 20, 99 \(2 of the 3 ids to remove\); nothing was removed"):
        remove_items(directory, [3, 20, 99])
    with pytest.raises(UserValueError, match="would leave gallery g empty"):
        remove_items(directory, list(range(20)))
    with pytest.raises(UserValueError, match="4 dimensions, the gallery 8"):
        add_items(directory, np.eye(2, 4, dtype=np.float32), sources(2, "x"), image_root="/data", note="x")
    with pytest.raises(ValueError, match="unit vectors"):
        add_items(directory, np.full((2, DIM), 0.5, dtype=np.float32), sources(2, "x"), image_root="/data", note="")
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [".g.lock", "g"]  # no half-written version left


def test_an_on_disk_ivf_gallery_is_refused_with_how_to_change_it(tmp_path, model):
    vectors = unit_vectors(400, seed=0)
    directory = build(tmp_path / "g", model, vectors, "ivf-flat", storage="ondisk", nlist=4)
    with pytest.raises(UserValueError, match="lists on disk .* rebuild it with `sct index`"):
        remove_items(directory, [1])


def test_a_format_2_gallery_is_read_and_changed(tmp_path, model):
    """Galleries written before ids outlived removals: format 2, no next_id, no history."""
    directory = build(tmp_path / "g", model, unit_vectors(30, seed=0))
    manifest = json.loads((directory / "manifest.json").read_text())
    for key in ("next_id", "history"):
        del manifest[key]
    (directory / "manifest.json").write_text(json.dumps(manifest | {"format_version": 2}))
    assert len(Gallery.load(directory).items) == 30
    assert add_items(directory, unit_vectors(1, seed=5), sources(1, "n"), image_root="/data", note="n") == [30]
    history = Gallery.load(directory).manifest["history"]
    assert [entry["change"] for entry in history] == ["build", "add"] and history[0]["count"] == 30


def test_concurrent_changes_wait_for_each_other_and_lose_nothing(tmp_path, model):
    directory = build(tmp_path / "g", model, unit_vectors(30, seed=0))
    errors = []

    def add(seed: int) -> None:
        try:
            add_items(directory, unit_vectors(5, seed=seed), sources(5, f"t{seed}"), image_root="/data", note="t")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(seed,)) for seed in (10, 11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gallery = Gallery.load(directory)
    assert errors == [] and gallery.items.ids.tolist() == list(range(45))
    assert len({item.path for item in gallery.items}) == 45


def random_filter(rng: np.random.Generator, ids: np.ndarray) -> SearchFilter:
    labels = [f"class {i}" for i in range(7)]
    choice = rng.integers(0, 5)
    if choice == 0:
        return SearchFilter(labels=frozenset(rng.choice(labels, rng.integers(1, 3), replace=False).tolist()))
    if choice == 1:
        return SearchFilter(exclude_labels=frozenset(rng.choice(labels, rng.integers(1, 6), replace=False).tolist()))
    if choice == 2:  # few items, some of them not in the gallery
        return SearchFilter(ids=rng.choice(np.arange(COUNT + 50), rng.integers(1, 6), replace=False))
    if choice == 3:
        start = int(rng.integers(0, COUNT + 40))
        return SearchFilter(id_range=(start, start + int(rng.integers(0, 60))))
    return SearchFilter(labels=frozenset(labels[:4]), exclude_labels=frozenset(labels[1:2]), id_range=(100, 400))


def allowed_by_loop(gallery: Gallery, search_filter: SearchFilter) -> np.ndarray:
    """The allowed ids, one item at a time."""
    allowed = []
    for item in gallery.items:
        if search_filter.labels is not None and item.label not in search_filter.labels:
            continue
        if item.label in search_filter.exclude_labels:
            continue
        if search_filter.ids is not None and item.id not in set(search_filter.ids.tolist()):
            continue
        if search_filter.id_range is not None and not search_filter.id_range[0] <= item.id < search_filter.id_range[1]:
            continue
        allowed.append(item.id)
    return np.array(allowed, dtype=np.int64)


@pytest.mark.parametrize("index_type", EXACT_OPTIONS)
@pytest.mark.parametrize("path", ["exact", "selector"])
def test_filtered_search_equals_brute_force_over_the_allowed_items(tmp_path, model, monkeypatch, index_type, path):
    """Few allowed items are ranked exactly; many go through FAISS's IDSelector (EXACT_FILTER_MAX set to 0 here
    sends every filter that way)."""
    if path == "selector":
        monkeypatch.setattr(gallery_module, "EXACT_FILTER_MAX", 0)
    directory, ids, vectors = changed_gallery(tmp_path, model, index_type, **EXACT_OPTIONS[index_type])
    gallery = Gallery.load(directory)
    rng = np.random.default_rng(7)
    queries = unit_vectors(6, seed=3)
    overlaps = []
    for _ in range(40):
        search_filter = random_filter(rng, ids)
        allowed = allowed_by_loop(gallery, search_filter)
        scores, found = gallery.search(queries, 8, search_filter)
        assert found.shape == (6, min(8, len(allowed))), search_filter.describe()
        if not len(allowed):
            continue
        expected = brute_force(queries, allowed, vectors[np.searchsorted(ids, allowed)], 8)
        if index_type == "hnsw" and path == "selector":  # approximate, but only allowed items
            assert set(found[found >= 0].tolist()) <= set(allowed.tolist())
            overlaps += [len(set(a) & set(e)) / len(e) for a, e in zip(found.tolist(), expected.tolist())]
        else:
            assert found.tolist() == expected.tolist(), search_filter.describe()
    if overlaps:
        assert np.mean(overlaps) >= 0.9


def test_filter_values_parse_or_name_what_is_wrong():
    assert parse_id_list(" 3, 17,3 ,42").tolist() == [3, 17, 42]
    assert parse_id_range("10-20") == (10, 20)
    for bad in ("", "a,b", "-3", "1e3", "9" * 30):
        with pytest.raises(UserValueError, match="ids must be item ids"):
            parse_id_list(bad)
    for bad in ("10", "20-10", "a-b", "-5-3", "1-"):
        with pytest.raises(UserValueError, match="id range"):
            parse_id_range(bad)
    assert SearchFilter().empty and not SearchFilter(id_range=(0, 0)).empty
