"""Metrics against a brute-force reference written with explicit Python loops."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import evaluate, evaluate_per_query, knn_exclude_self
from retrieval.similarity_histogram import sample_queries


def unit_vectors(rng: np.random.Generator, count: int, dim: int = 16) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def reference_metrics(gallery, gallery_labels, queries, query_labels, query_ids, ks):
    """Rank every gallery item for every query in float64, one query at a time."""
    per_k = {k: [] for k in ks}
    average_precisions, skipped = [], 0
    for q, (vector, label, own_id) in enumerate(zip(queries, query_labels, query_ids)):
        candidates = [j for j in range(len(gallery)) if j != own_id]
        relevant = sum(1 for j in candidates if gallery_labels[j] == label)
        if relevant == 0:
            skipped += 1
            continue
        scores = {j: float(np.dot(vector.astype(np.float64), gallery[j].astype(np.float64))) for j in candidates}
        ranked = sorted(candidates, key=lambda j: -scores[j])
        correct = [gallery_labels[j] == label for j in ranked]
        for k in ks:
            per_k[k].append(any(correct[:k]))
        precision_sum, found = 0.0, 0
        for i in range(relevant):
            if correct[i]:
                found += 1
                precision_sum += found / (i + 1)
        average_precisions.append(precision_sum / relevant)
    expected = {f"recall@{k}": float(np.mean(per_k[k])) for k in ks}
    expected["map@r"] = float(np.mean(average_precisions))
    expected["precision@1"] = float(np.mean(per_k[ks[0]])) if ks[0] == 1 else None
    expected["queries"] = len(average_precisions)
    expected["skipped"] = skipped
    return expected


def assert_metrics_equal(actual, expected):
    for key, value in expected.items():
        if value is None:
            continue
        assert actual[key] == pytest.approx(value, abs=1e-9), key


def clustered_gallery(rng, class_sizes, dim=16, spread=1.0):
    """Unit vectors around one random centre per class, so recall is neither 0 nor 1."""
    centres = unit_vectors(rng, len(class_sizes), dim)
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    vectors = centres[labels] + spread * unit_vectors(rng, len(labels), dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def test_leave_one_out_matches_brute_force_with_singletons_skipped():
    rng = np.random.default_rng(1)
    class_sizes = [1, 2, 3, 5, 8, 20, 1, 4, 6, 30]  # largest R (29) exceeds max k
    gallery, labels = clustered_gallery(rng, class_sizes)
    labels = np.array([f"class-{label}" for label in labels])
    ks = (1, 2, 4, 8)
    actual = evaluate(gallery, labels, ks)
    expected = reference_metrics(gallery, labels, gallery, labels, range(len(gallery)), ks)
    assert expected["skipped"] == 2
    assert 0.2 < expected["recall@1"] < 0.95 and 0.1 < expected["map@r"] < 0.9  # the case is not degenerate
    assert_metrics_equal(actual, expected)


def test_separate_queries_match_brute_force_and_unknown_labels_are_skipped():
    rng = np.random.default_rng(2)
    gallery, gallery_labels = clustered_gallery(rng, [3, 4, 5, 6, 7, 8])
    queries, query_labels = clustered_gallery(rng, [2, 2, 2, 2, 2, 2, 3])  # class 6 is not in the gallery
    ks = (1, 3, 10)
    actual = evaluate(gallery, gallery_labels, ks, query_emb=queries, query_labels=query_labels)
    expected = reference_metrics(gallery, gallery_labels, queries, query_labels, [-1] * len(queries), ks)
    assert expected["skipped"] == 3 and actual["skipped"] == 3
    assert_metrics_equal(actual, expected)


def test_self_is_excluded_by_id_when_a_duplicate_of_another_class_ties_with_it():
    rng = np.random.default_rng(3)
    cluster, labels = clustered_gallery(rng, [4, 4, 4, 2, 2])  # classes 3 and 4 get a far-away twin each
    cluster[:, 0] = 0
    cluster = 0.7 * np.eye(16, dtype=np.float32)[0] + 0.714 * cluster / np.linalg.norm(cluster, axis=1, keepdims=True)
    twin = -np.eye(16, dtype=np.float32)[0]  # scores about -0.7 with everything else: always ranked last
    gallery = np.concatenate([cluster, [twin, twin]]).astype(np.float32)
    labels = np.append(labels, [3, 4])  # identical vectors, different labels
    twins = np.array([len(gallery) - 2, len(gallery) - 1])
    _, ids = knn_exclude_self(gallery, gallery[twins], 1, query_ids=twins)
    assert ids[:, 0].tolist() == twins[::-1].tolist()  # each sees its twin first, never itself
    ks = (1, 2, 4)
    actual = evaluate(gallery, labels, ks)
    expected = reference_metrics(gallery, labels, gallery, labels, range(len(gallery)), ks)
    assert_metrics_equal(actual, expected)


def test_exact_duplicates_within_a_class_and_many_ties():
    rng = np.random.default_rng(4)
    base, base_labels = clustered_gallery(rng, [3, 3, 3, 3])
    gallery = np.repeat(base, 3, axis=0)  # every vector three times, same label: scores tie exactly
    labels = np.repeat(base_labels, 3)
    ks = (1, 2, 4)
    actual = evaluate(gallery, labels, ks)
    expected = reference_metrics(gallery, labels, gallery, labels, range(len(gallery)), ks)
    assert actual["recall@1"] == 1.0  # a twin is always first
    assert_metrics_equal(actual, expected)


def test_query_pushed_out_by_duplicates_drops_the_last_neighbour():
    gallery = np.tile(np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32), (6, 1))
    scores, ids = knn_exclude_self(gallery, gallery, 2, query_ids=np.arange(6))
    assert ids.shape == (6, 2) and np.allclose(scores, 1.0)
    for own_id, row in enumerate(ids):
        assert own_id not in row and len(set(row.tolist())) == 2


def test_knn_exclude_self_matches_sorting_in_chunks():
    rng = np.random.default_rng(5)
    gallery = unit_vectors(rng, 50)
    queries = gallery[10:30]
    scores, ids = knn_exclude_self(gallery, queries, 5, query_ids=np.arange(10, 30), chunk_size=7)
    similarities = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    for row, own_id in enumerate(range(10, 30)):
        similarities[row, own_id] = -np.inf
        assert ids[row].tolist() == np.argsort(-similarities[row])[:5].tolist()
        assert np.allclose(scores[row], similarities[row, ids[row]], atol=1e-6)
    _, plain = knn_exclude_self(gallery, queries, 60)  # deeper than the gallery: all 50, self included
    assert plain.shape == (20, 50) and plain[:, 0].tolist() == list(range(10, 30))


def test_extra_labels_report_their_own_recall():
    rng = np.random.default_rng(6)
    gallery, hotels = clustered_gallery(rng, [2, 3, 1, 4, 2, 5, 1, 3])
    chains = hotels // 3
    actual = evaluate(gallery, hotels, (1, 2), extra_labels={"chain": (chains, None, (1, 3, 5))})
    expected = reference_metrics(gallery, chains, gallery, chains, range(len(gallery)), (1, 3, 5))
    for k in (1, 3, 5):
        assert actual[f"chain_recall@{k}"] == pytest.approx(expected[f"recall@{k}"], abs=1e-9)
    assert actual["chain_queries"] == expected["queries"] and actual["chain_skipped"] == expected["skipped"]
    assert actual["skipped"] == 2  # the two singleton hotels, still scored for their chain
    assert actual["chain_skipped"] == 0


def test_nothing_to_evaluate_is_an_error():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="no query"):
        evaluate(unit_vectors(rng, 4), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="together"):
        evaluate(unit_vectors(rng, 4), ["a", "a", "b", "b"], query_emb=unit_vectors(rng, 2))


# ------------------------------------------------------------------ galleries streamed from disk
class CountingRows:
    """A row source like Gallery.vectors(): shape, slices and id arrays, counting the rows it hands out."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors, self.shape, self.rows_read = vectors, vectors.shape, 0

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, key):
        rows = self.vectors[key]
        self.rows_read += len(rows)
        return rows.copy()


def _clustered(rng: np.random.Generator, count: int, dim: int = 16, per_class: int = 5):
    labels = rng.integers(0, count // per_class, count)
    vectors = rng.standard_normal((count // per_class, dim)).astype(np.float32)[labels]
    vectors += 0.8 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def test_a_streamed_gallery_gives_the_in_memory_results(monkeypatch, tmp_path):
    import retrieval.metrics as metrics

    rng = np.random.default_rng(11)
    vectors, all_labels = _clustered(rng, 3400)
    gallery, labels, queries, query_labels = vectors[:3000], all_labels[:3000], vectors[3000:], all_labels[3000:]
    monkeypatch.setattr(metrics, "GALLERY_BLOCK_BYTES", 4 * 16 * 250)  # blocks of 250 rows
    monkeypatch.setattr(metrics, "STREAMED_RESULT_BYTES", 12 * 9 * 700)  # query chunks of about 700
    np.save(tmp_path / "g.npy", gallery)
    on_disk = np.load(tmp_path / "g.npy", mmap_mode="r")
    for kwargs in ({}, {"query_emb": queries, "query_labels": query_labels}):
        expected = evaluate(gallery, labels, ks=(1, 2, 4, 8), **kwargs)
        source = CountingRows(gallery)
        assert evaluate(source, labels, ks=(1, 2, 4, 8), **kwargs, chunk_size=64) == expected
        assert evaluate(on_disk, labels, ks=(1, 2, 4, 8), **kwargs, chunk_size=64) == expected
        assert 0.2 < expected["recall@1"] < 0.95
        # whole passes over the gallery, one per query chunk (plus the queries' own rows in leave-one-out)
        passes, partial = divmod(source.rows_read - (0 if kwargs else expected["queries"]), len(gallery))
        assert partial == 0 and (passes == 1 if kwargs else passes >= 2)  # 400 queries: one chunk
    scores, ids = knn_exclude_self(
        CountingRows(gallery), gallery[:50], 10, query_ids=np.arange(50), block_bytes=4 * 16 * 128
    )
    expected_scores, expected_ids = knn_exclude_self(gallery, gallery[:50], 10, query_ids=np.arange(50))
    assert ids.tolist() == expected_ids.tolist() and np.allclose(scores, expected_scores, atol=1e-6)


def test_streaming_keeps_memory_far_below_the_gallery(monkeypatch, tmp_path):
    import tracemalloc

    import retrieval.metrics as metrics

    gallery, labels = _clustered(np.random.default_rng(13), 20_000, dim=256)  # 20 MiB of vectors
    np.save(tmp_path / "g.npy", gallery)
    del gallery
    monkeypatch.setattr(metrics, "GALLERY_BLOCK_BYTES", 1 << 18)
    monkeypatch.setattr(metrics, "STREAMED_RESULT_BYTES", 1 << 18)
    on_disk = np.load(tmp_path / "g.npy", mmap_mode="r")
    tracemalloc.start()
    results = evaluate(on_disk, labels, ks=(1, 2, 4, 8), chunk_size=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert results["queries"] > 15_000
    assert peak < on_disk.nbytes / 4, f"peak {peak / 2**20:.1f} MiB for {on_disk.nbytes / 2**20:.1f} MiB of vectors"


# ------------------------------------------------------------------ per-query results
def reference_per_query(gallery, gallery_labels, queries, query_labels, query_ids, top, depth, sample=None):
    """Each evaluated query's results and the pair histogram, one query and one pair at a time in float64."""
    expected = {key: [] for key in ("rows", "first", "relevant", "ap", "r_precision", "top_ids", "top_scores")}
    edges = np.linspace(-1, 1, 101)
    positive, negative = np.zeros(100, dtype=np.int64), np.zeros(100, dtype=np.int64)
    for q, (vector, label, own_id) in enumerate(zip(queries, query_labels, query_ids)):
        candidates = [j for j in range(len(gallery)) if j != own_id]
        relevant = sum(1 for j in candidates if gallery_labels[j] == label)
        if relevant == 0:
            continue
        scores = {j: float(np.dot(vector.astype(np.float64), gallery[j].astype(np.float64))) for j in candidates}
        ranked = sorted(candidates, key=lambda j: -scores[j])
        correct = [gallery_labels[j] == label for j in ranked]
        first = next((i + 1 for i, c in enumerate(correct) if c), 0)
        found, precision_sum = 0, 0.0
        for i in range(relevant):
            if correct[i]:
                found += 1
                precision_sum += found / (i + 1)
        expected["rows"].append(q)
        expected["first"].append(first if first <= depth else 0)
        expected["relevant"].append(relevant)
        expected["ap"].append(precision_sum / relevant)
        expected["r_precision"].append(found / relevant)
        shown = ranked[:top]
        expected["top_ids"].append(shown + [-1] * (top - len(shown)))
        expected["top_scores"].append([scores[j] for j in shown] + [np.nan] * (top - len(shown)))
        if sample is None or q in sample:
            for j in candidates:
                counts = positive if gallery_labels[j] == label else negative
                counts += np.histogram([min(max(scores[j], -1.0), 1.0)], bins=edges)[0]
    return {key: np.array(value) for key, value in expected.items()}, positive, negative


def assert_per_query_equal(per_query, expected, positive, negative):
    np.testing.assert_array_equal(per_query.rows, expected["rows"])
    np.testing.assert_array_equal(per_query.first_correct_rank, expected["first"])
    np.testing.assert_array_equal(per_query.relevant, expected["relevant"])
    np.testing.assert_allclose(per_query.ap_at_r, expected["ap"], atol=1e-12)
    np.testing.assert_allclose(per_query.r_precision, expected["r_precision"], atol=1e-12)
    np.testing.assert_array_equal(per_query.top_ids, expected["top_ids"])
    np.testing.assert_allclose(per_query.top_scores, expected["top_scores"], atol=1e-6)  # NaN matches NaN
    np.testing.assert_array_equal(per_query.histogram.edges, np.linspace(-1, 1, 101))
    np.testing.assert_array_equal(per_query.histogram.positive, positive)
    np.testing.assert_array_equal(per_query.histogram.negative, negative)


def test_per_query_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(21)
    gallery, labels = clustered_gallery(rng, [1, 2, 3, 5, 8, 12, 1, 4, 6, 9], spread=1.6)
    labels = np.array([f"class-{label}" for label in labels])
    ks = (1, 2, 4)
    results, per_query = evaluate_per_query(gallery, labels, ks, top=6, chunk_size=7)
    assert results == evaluate(gallery, labels, ks)  # the metrics are evaluate's
    assert per_query.depth == 11  # the largest R
    expected, positive, negative = reference_per_query(
        gallery, labels, gallery, labels, range(len(gallery)), 6, per_query.depth
    )
    assert_per_query_equal(per_query, expected, positive, negative)
    assert len(per_query.rows) == results["queries"] == 49 and per_query.histogram.queries == 49
    assert (per_query.first_correct_rank == 0).any() and (per_query.first_correct_rank > 1).any()  # not degenerate
    assert per_query.label_names[per_query.label].tolist() == labels[per_query.rows].tolist()
    assert np.mean(per_query.ap_at_r) == pytest.approx(results["map@r"], abs=1e-12)
    assert np.mean(per_query.first_correct_rank == 1) == pytest.approx(results["recall@1"], abs=1e-12)
    assert positive.sum() == per_query.relevant.sum()  # every positive pair, the query itself excluded
    assert positive.sum() + negative.sum() == 49 * (len(gallery) - 1)


def test_per_query_with_separate_queries_and_a_gallery_smaller_than_top():
    rng = np.random.default_rng(22)
    gallery, gallery_labels = clustered_gallery(rng, [2, 3, 4])
    queries, query_labels = clustered_gallery(rng, [2, 2, 2, 3])  # class 3 is not in the gallery
    results, per_query = evaluate_per_query(
        gallery, gallery_labels, (1, 2), query_emb=queries, query_labels=query_labels, top=12
    )
    assert per_query.depth == 9 and results["skipped"] == 3
    expected, positive, negative = reference_per_query(
        gallery, gallery_labels, queries, query_labels, [-1] * len(queries), 12, 9
    )
    assert_per_query_equal(per_query, expected, positive, negative)
    assert (per_query.top_ids[:, 9:] == -1).all() and np.isnan(per_query.top_scores[:, 9:]).all()
    assert positive.sum() + negative.sum() == 6 * len(gallery)


def test_the_histogram_covers_a_seeded_sample_when_there_are_more_queries():
    rng = np.random.default_rng(23)
    gallery, labels = clustered_gallery(rng, [4, 5, 6, 7, 8])
    _, per_query = evaluate_per_query(gallery, labels, (1,), top=3, histogram_queries=6, seed=3)
    sample = per_query.rows[sample_queries(len(per_query.rows), 6, seed=3)]
    assert len(sample) == 6 and per_query.histogram.queries == 6
    expected, positive, negative = reference_per_query(
        gallery, labels, gallery, labels, range(len(gallery)), 3, per_query.depth, sample=set(sample.tolist())
    )
    assert_per_query_equal(per_query, expected, positive, negative)
    assert positive.sum() + negative.sum() == 6 * (len(gallery) - 1)
    _, again = evaluate_per_query(gallery, labels, (1,), top=3, histogram_queries=6, seed=3)
    _, other = evaluate_per_query(gallery, labels, (1,), top=3, histogram_queries=6, seed=4)
    assert (again.histogram.positive == positive).all() and (other.histogram.negative != negative).any()


def test_per_query_of_a_streamed_gallery_equals_in_memory(monkeypatch):
    import retrieval.metrics as metrics
    import retrieval.similarity_histogram as histogram

    rng = np.random.default_rng(24)
    vectors, all_labels = _clustered(rng, 1200)
    gallery, labels, queries, query_labels = vectors[:1000], all_labels[:1000], vectors[1000:], all_labels[1000:]
    for kwargs in ({}, {"query_emb": queries, "query_labels": query_labels}):
        expected_results, expected = evaluate_per_query(gallery, labels, (1, 4), **kwargs, top=5)
        monkeypatch.setattr(metrics, "GALLERY_BLOCK_BYTES", 4 * 16 * 90)  # blocks of 90 rows
        monkeypatch.setattr(metrics, "STREAMED_RESULT_BYTES", 12 * 9 * 150)
        monkeypatch.setattr(histogram, "HISTOGRAM_BLOCK_BYTES", 20_000)  # a few rows per histogram block
        results, streamed = evaluate_per_query(CountingRows(gallery), labels, (1, 4), **kwargs, top=5, chunk_size=64)
        monkeypatch.undo()
        assert results == expected_results
        for name in ("rows", "label", "first_correct_rank", "relevant", "ap_at_r", "r_precision", "top_ids"):
            np.testing.assert_array_equal(getattr(streamed, name), getattr(expected, name), err_msg=name)
        np.testing.assert_allclose(streamed.top_scores, expected.top_scores, atol=1e-6)
        np.testing.assert_array_equal(streamed.histogram.positive, expected.histogram.positive)
        np.testing.assert_array_equal(streamed.histogram.negative, expected.histogram.negative)
        assert streamed.histogram.positive.sum() == expected.relevant.sum() > 0


def test_per_query_memory_stays_far_below_the_gallery(monkeypatch, tmp_path):
    """No N x N similarities (1.5 GiB here), and not even the vectors (20 MiB) held at once."""
    import tracemalloc

    import retrieval.metrics as metrics
    import retrieval.similarity_histogram as histogram

    gallery, labels = _clustered(np.random.default_rng(25), 20_000, dim=256)
    np.save(tmp_path / "g.npy", gallery)
    del gallery
    monkeypatch.setattr(metrics, "GALLERY_BLOCK_BYTES", 1 << 18)
    monkeypatch.setattr(metrics, "STREAMED_RESULT_BYTES", 1 << 18)
    monkeypatch.setattr(histogram, "HISTOGRAM_BLOCK_BYTES", 1 << 20)
    on_disk = np.load(tmp_path / "g.npy", mmap_mode="r")
    tracemalloc.start()
    results, per_query = evaluate_per_query(on_disk, labels, (1, 2), top=4, chunk_size=256, histogram_queries=300)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert results["queries"] > 15_000 and per_query.histogram.queries == 300
    assert peak < on_disk.nbytes / 2, f"peak {peak / 2**20:.1f} MiB for {on_disk.nbytes / 2**20:.1f} MiB of vectors"


def test_per_query_needs_top_at_least_1():
    rng = np.random.default_rng(26)
    with pytest.raises(ValueError, match="top must be at least 1"):
        evaluate_per_query(unit_vectors(rng, 4), ["a", "a", "b", "b"], top=0)
