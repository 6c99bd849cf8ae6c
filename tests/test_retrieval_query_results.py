"""retrieval.query_results: the per-query file's round trip, per-class summary, failing rows and load errors."""

from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import pytest

from retrieval.query_results import (
    QUERY_RESULTS_FILE,
    ClassResult,
    QueryResults,
    failing_rows,
    load_query_results,
    per_class,
    save_query_results,
)


def make_results(rows: int = 40, top: int = 5, *, mode: str = "leave-one-out", seed: int = 0) -> QueryResults:
    rng = np.random.default_rng(seed)
    names = np.array(["bird", "car", "chair", "dog", "égal"])
    relevant = rng.integers(1, 9, rows)
    bins = 100
    return QueryResults(
        query_item=np.arange(rows) * 3 if mode == "leave-one-out" else np.full(rows, -1),
        query_path=np.array([f"q/{i}/é.jpg".encode() for i in range(rows)]) if mode == "queries" else np.zeros(0, "S1"),
        label=rng.integers(0, 4, rows),  # "égal" has no queries
        label_names=names,
        first_correct_rank=rng.choice([0, 1, 1, 2, 3, 7], rows),
        relevant=relevant,
        ap_at_r=rng.random(rows),
        r_precision=rng.random(rows),
        top_ids=rng.integers(0, 1000, (rows, top)),
        top_scores=rng.random((rows, top)),
        depth=12,
        mode=mode,
        model_sha256="ab" * 32,
        hist_edges=np.linspace(-1, 1, bins + 1),
        hist_positive=rng.integers(0, 50, bins),
        hist_negative=rng.integers(0, 500, bins),
        hist_queries=rows,
    )


@pytest.mark.parametrize("mode", ["leave-one-out", "queries"])
def test_save_and_load_round_trip_every_array_with_its_dtype(tmp_path, mode):
    results = make_results(mode=mode)
    results.top_ids[3, 4] = -1
    results.top_scores[3, 4] = np.nan
    assert save_query_results(results, tmp_path / QUERY_RESULTS_FILE) == tmp_path / QUERY_RESULTS_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [QUERY_RESULTS_FILE]  # no temporary left, no ".npz.npz"
    loaded = load_query_results(tmp_path)
    assert loaded is not None and len(loaded) == len(results) == 40
    dtypes = {
        "query_item": np.int64,
        "label": np.int32,
        "first_correct_rank": np.int32,
        "relevant": np.int32,
        "ap_at_r": np.float32,
        "r_precision": np.float32,
        "top_ids": np.int64,
        "top_scores": np.float32,
        "hist_edges": np.float64,
        "hist_positive": np.int64,
        "hist_negative": np.int64,
    }
    for name, dtype in dtypes.items():
        assert getattr(loaded, name).dtype == dtype, name
        np.testing.assert_array_equal(getattr(loaded, name), getattr(results, name), err_msg=name)
    assert loaded.query_path.dtype.kind == "S" and loaded.label_names.dtype.kind == "U"
    np.testing.assert_array_equal(loaded.query_path, results.query_path)
    np.testing.assert_array_equal(loaded.label_names, results.label_names)
    assert (loaded.depth, loaded.mode, loaded.model_sha256, loaded.hist_queries) == (12, mode, "ab" * 32, 40)
    assert type(loaded.depth) is int and type(loaded.mode) is str and type(loaded.hist_queries) is int
    assert loaded.label_of(7) == results.label_names[results.label[7]]
    if mode == "queries":
        assert loaded.query_path[5].decode() == "q/5/é.jpg"
    with np.load(tmp_path / QUERY_RESULTS_FILE, allow_pickle=False) as stored:  # a plain npz, no pickle
        assert set(stored.files) == {field.name for field in dataclasses.fields(QueryResults)}
    with zipfile.ZipFile(tmp_path / QUERY_RESULTS_FILE) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


def test_load_gives_none_without_the_file(tmp_path):
    assert load_query_results(tmp_path) is None


def test_per_class_matches_a_loop_worst_first():
    results = make_results(rows=60, seed=3)
    expected = []
    for code, name in enumerate(results.label_names):
        rows = [i for i in range(len(results)) if results.label[i] == code]
        if rows:
            recall = sum(results.first_correct_rank[i] == 1 for i in rows) / len(rows)
            average = sum(float(results.ap_at_r[i]) for i in rows) / len(rows)
            expected.append((str(name), len(rows), recall, average))
    expected.sort(key=lambda e: (e[2], e[3], e[0]))
    classes = per_class(results)
    assert all(isinstance(c, ClassResult) for c in classes)
    assert [(c.label, c.queries) for c in classes] == [(e[0], e[1]) for e in expected]
    assert "égal" not in [c.label for c in classes]
    np.testing.assert_allclose([c.recall_at_1 for c in classes], [e[2] for e in expected])
    np.testing.assert_allclose([c.map_at_r for c in classes], [e[3] for e in expected], rtol=1e-6)
    assert [c.recall_at_1 for c in classes] == sorted(c.recall_at_1 for c in classes)


def test_per_class_breaks_ties_by_map_then_label():
    results = make_results(rows=4)
    results = dataclasses.replace(
        results,
        label=np.array([2, 1, 0, 3]),
        first_correct_rank=np.array([1, 1, 1, 2]),
        ap_at_r=np.array([0.5, 0.5, 0.75, 0.0]),
    )
    assert [c.label for c in per_class(results)] == ["dog", "car", "chair", "bird"]


def test_failing_rows_match_a_loop():
    results = make_results(rows=50, seed=5)
    assert failing_rows(results).tolist() == [i for i in range(50) if results.first_correct_rank[i] != 1]
    for name in results.label_names:
        expected = [i for i in range(50) if results.first_correct_rank[i] != 1 and results.label_of(i) == name]
        assert failing_rows(results, str(name)).tolist() == expected, name
    assert failing_rows(results, "no such label").tolist() == []
    assert len(failing_rows(results, "bird")) > 0


def _rewrite(path, drop=(), **replace):
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files if name not in drop}
    arrays.update(replace)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": ("ap_at_r", "depth")}, "missing ap_at_r, depth"),
        ({"label": np.zeros(39, np.int32)}, "label has shape (39,)"),
        ({"top_scores": np.zeros((40, 4), np.float32)}, "top_ids (40, 5) and top_scores (40, 4)"),
        ({"top_ids": np.zeros(40, np.int64)}, "top_ids has shape (40,)"),
        ({"query_path": np.array([b"a.jpg"])}, "query_path has shape (1,)"),
        ({"hist_negative": np.zeros(99, np.int64)}, "hist_negative (99,)"),
        ({"label": np.full(40, 9)}, "label values must index label_names"),
        ({"mode": np.array("both")}, "mode is 'both'"),
        ({"depth": np.array([12, 13])}, "depth has shape (2,)"),
        ({"ap_at_r": np.array(["x"] * 40)}, "ap_at_r has dtype <U1"),
        ({"query_item": np.array([None] * 40)}, "allow_pickle"),
    ],
)
def test_load_refuses_a_broken_file_naming_it(tmp_path, change, message):
    path = save_query_results(make_results(), tmp_path / QUERY_RESULTS_FILE)
    _rewrite(path, **change)
    with pytest.raises(ValueError, match=f"eval_queries.npz of gallery '{tmp_path.name}' cannot be read") as error:
        load_query_results(tmp_path)
    assert message in str(error.value)
    assert str(tmp_path) not in str(error.value)  # the folder's name only: a server may show the message


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"", b"not numpy at all", b"\x93NUMPY\x01\x00"])
def test_load_refuses_a_file_that_is_not_an_npz(tmp_path, content):
    (tmp_path / QUERY_RESULTS_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=f"eval_queries.npz of gallery '{tmp_path.name}' cannot be read"):
        load_query_results(tmp_path)


def test_an_unreadable_file_is_a_value_error_without_the_path(tmp_path, monkeypatch):
    (tmp_path / QUERY_RESULTS_FILE).mkdir()  # there, but not a file: nothing to read
    assert load_query_results(tmp_path) is None
    (tmp_path / QUERY_RESULTS_FILE).rmdir()
    path = save_query_results(make_results(), tmp_path / QUERY_RESULTS_FILE)

    def denied(file, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(np, "load", denied)
    with pytest.raises(ValueError, match="cannot be read: Permission denied; run sct eval again") as error:
        load_query_results(tmp_path)
    assert str(path) not in str(error.value) and isinstance(error.value.__cause__, PermissionError)


def test_results_that_do_not_fit_together_are_refused_when_built():
    with pytest.raises(ValueError, match="relevant has shape"):
        dataclasses.replace(make_results(), relevant=np.ones(3))
