"""Re-ranking (retrieval.rerank) against plain full-matrix implementations on small sets."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from core.errors import UserValueError
from retrieval.gallery import Gallery
from retrieval.metrics import evaluate
from retrieval.rerank import Reranker, RerankParams, VectorSource, rerank_knn, rerank_search
from sct.cli import main


def _unit(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((count, dim))
    # a few clusters, so that neighbourhoods overlap the way real embeddings do
    vectors[: count // 2] += 1.5 * rng.standard_normal(dim)
    vectors[count // 2 :] += 1.5 * rng.standard_normal(dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def brute_k_reciprocal(points: np.ndarray, query: int, k1: int, k2: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Every other point of ``points`` ordered by the k-reciprocal distance to point ``query``, from full
    P × P matrices (P = all points): the ranking and the final distances."""
    count = len(points)
    similarity = points.astype(np.float64) @ points.T.astype(np.float64)
    distance = (1 - similarity) / 2
    ranking_key = distance.copy()
    np.fill_diagonal(ranking_key, -np.inf)  # each point first in its own list
    order = np.argsort(ranking_key, axis=1, kind="stable")
    half = (k1 + 1) // 2

    def reciprocal(i: int, k: int) -> list[int]:
        return [j for j in order[i, : k + 1] if i in order[j, : k + 1]]

    raw = np.zeros((count, count))
    for i in range(count):
        near = reciprocal(i, k1)
        members = set(near)
        for c in near:
            candidate = reciprocal(c, half)
            if len(set(candidate) & set(near)) > 2 / 3 * len(candidate):
                members |= set(candidate)
        members = sorted(members)
        raw[i, members] = np.exp(-distance[i, members])
        raw[i] /= raw[i].sum()
    encoded = np.zeros_like(raw)
    for i in range(count):
        encoded[i] = raw[order[i, :k2]].mean(axis=0)
    jaccard = np.array(
        [
            1 - np.minimum(encoded[query], encoded[j]).sum() / np.maximum(encoded[query], encoded[j]).sum()
            for j in range(count)
        ]
    )
    final = (1 - lam) * jaccard + lam * distance[query]
    others = np.array([j for j in np.argsort(final, kind="stable") if j != query])
    return others, final[others]


@pytest.mark.parametrize("k1,k2", [(6, 3), (4, 1), (9, 5)])
def test_k_reciprocal_leave_one_out_matches_full_matrices(k1, k2):
    gallery = _unit(np.random.default_rng(k1), 60, 8)
    params = RerankParams("k-reciprocal", k1=k1, k2=k2, lam=0.3, candidates=100)
    reranker = Reranker(VectorSource.of_rows(gallery), params)
    query_ids = np.arange(len(gallery))
    scores, ids = reranker.search(gallery, 59, query_ids)
    for query in range(len(gallery)):
        expected, distances = brute_k_reciprocal(gallery, query, k1, k2, 0.3)
        np.testing.assert_array_equal(ids[query], expected)
        np.testing.assert_allclose(scores[query], 1 - distances, atol=1e-5)


def test_k_reciprocal_query_matches_full_matrices_with_the_query_among_the_points():
    rng = np.random.default_rng(3)
    gallery, queries = _unit(rng, 60, 8), _unit(rng, 5, 8)
    reranker = Reranker(VectorSource.of_rows(gallery), RerankParams("k-reciprocal", k1=7, k2=3, candidates=60))
    scores, ids = reranker.search(queries, 60)
    for row, query in enumerate(queries):
        expected, distances = brute_k_reciprocal(np.vstack([query, gallery]), 0, 7, 3, 0.3)
        np.testing.assert_array_equal(ids[row], expected - 1)
        np.testing.assert_allclose(scores[row], 1 - distances, atol=1e-5)


def test_k_reciprocal_reorders_only_the_candidates():
    gallery = _unit(np.random.default_rng(4), 60, 8)
    plain = Reranker(VectorSource.of_rows(gallery), RerankParams("none")).search(gallery, 59, np.arange(60))
    scores, ids = Reranker(VectorSource.of_rows(gallery), RerankParams("k-reciprocal", k1=6, candidates=10)).search(
        gallery, 59, np.arange(60)
    )
    for row in range(60):
        assert set(ids[row, :10]) == set(plain[1][row, :10])
        np.testing.assert_array_equal(ids[row, 10:], plain[1][row, 10:])
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # descending through the candidates and the tail
    assert not np.array_equal(ids[:, :10], plain[1][:, :10])  # it did re-order


def _explicit_qe(gallery, query, n, alpha, own=None):
    similarity = gallery @ query
    order = [j for j in np.argsort(-similarity, kind="stable") if j != own][:n]
    expanded = query.astype(np.float64).copy()
    for j in order:
        expanded += max(similarity[j], 0) ** alpha * gallery[j]
    expanded /= np.linalg.norm(expanded)
    final = gallery @ expanded
    return [j for j in np.argsort(-final, kind="stable") if j != own]


def test_query_expansion_matches_an_explicit_loop():
    rng = np.random.default_rng(5)
    gallery, queries = _unit(rng, 50, 6), _unit(rng, 4, 6)
    reranker = Reranker(VectorSource.of_rows(gallery), RerankParams("qe", n=4, alpha=3.0))
    _, ids = reranker.search(queries, 20)
    for row, query in enumerate(queries):
        assert ids[row].tolist() == _explicit_qe(gallery, query, 4, 3.0)[:20]
    _, ids = reranker.search(gallery, 20, np.arange(50))
    for row in range(50):
        assert ids[row].tolist() == _explicit_qe(gallery, gallery[row], 4, 3.0, own=row)[:20]


def _explicit_dba(gallery, n, alpha, without=None):
    kept = [j for j in range(len(gallery)) if j != without]
    augmented = {}
    for i in kept:
        similarity = gallery[kept] @ gallery[i]
        others = [kept[j] for j in np.argsort(-similarity, kind="stable") if kept[j] != i][:n]
        vector = gallery[i].astype(np.float64).copy()
        for j in others:
            vector += max(float(gallery[i] @ gallery[j]), 0) ** alpha * gallery[j]
        augmented[i] = vector / np.linalg.norm(vector)
    return augmented


def test_dba_matches_an_explicit_loop_and_leaves_the_query_out():
    rng = np.random.default_rng(6)
    gallery, queries = _unit(rng, 40, 6), _unit(rng, 3, 6)
    reranker = Reranker(VectorSource.of_rows(gallery), RerankParams("dba", n=3, alpha=2.0))
    augmented = _explicit_dba(gallery, 3, 2.0)
    scores, ids = reranker.search(queries, 10)
    for row, query in enumerate(queries):
        final = {j: vector @ query for j, vector in augmented.items()}
        assert ids[row].tolist() == sorted(final, key=lambda j: -final[j])[:10]
        np.testing.assert_allclose(scores[row], [final[j] for j in ids[row]], atol=1e-5)
    # leave-one-out: the gallery without the query is augmented, as if the query had never been indexed
    scores, ids = reranker.search(gallery, 39, np.arange(40))
    changed = 0
    for row in range(40):
        without = _explicit_dba(gallery, 3, 2.0, without=row)
        final = {j: vector @ gallery[row] for j, vector in without.items()}
        assert ids[row].tolist() == sorted(final, key=lambda j: -final[j])
        np.testing.assert_allclose(scores[row], [final[j] for j in ids[row]], atol=1e-5)
        changed += any(not np.allclose(without[j], augmented[j]) for j in without)
    assert changed  # some items did draw on a query


def test_eval_search_is_the_reranker_and_none_is_exact_search():
    gallery = _unit(np.random.default_rng(7), 30, 4)
    knn = rerank_knn(RerankParams("none"))
    scores, ids = knn(gallery, gallery, 5, query_ids=np.arange(30))
    exact = np.argsort(-(gallery @ gallery.T) + 10 * np.eye(30), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, exact)


def test_k_reciprocal_memory_stays_below_a_gallery_squared():
    count = 3000  # count × count float32 would be 36 MB
    gallery = _unit(np.random.default_rng(8), count, 16)
    reranker = Reranker(VectorSource.of_rows(gallery), RerankParams("k-reciprocal", k1=5, k2=2, candidates=20))
    tracemalloc.start()
    try:
        reranker.search(gallery[:200], 20, np.arange(200))
        reranker.search(gallery[:50] + 0.01, 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < count * count * 4 / 4, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "rank-fusion"},
        {"method": "k-reciprocal", "k1": 0},
        {"method": "qe", "n": 0},
        {"method": "k-reciprocal", "lam": 1.5},
        {"method": "k-reciprocal", "k1": 4, "k2": 6},
        {"method": "dba", "alpha": float("nan")},
    ],
)
def test_bad_settings_are_refused(settings):
    with pytest.raises(UserValueError):
        RerankParams(**settings)


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    model = make_tiny_model(root / "model.onnx")
    make_color_images(root / "images", per_class=5)
    out = root / "colors"
    assert main(["index", "--model", str(model), "--images", str(root / "images"), "--out", str(out)]) == 0
    return out


def test_sct_eval_rerank_scores_the_reranked_lists_and_records_them(colors, capsys):
    argv = ["eval", "--index", str(colors), "--k", "1", "2", "--rerank", "k-reciprocal", "--rerank-k1", "3"]
    assert main([*argv, "--rerank-k2", "2", "--rerank-candidates", "6"]) == 0
    saved = json.loads((colors / "eval.json").read_text())
    assert saved["rerank"] == {"method": "k-reciprocal", "k1": 3, "k2": 2, "lam": 0.3, "candidates": 6}
    gallery = Gallery.load(colors)
    params = RerankParams("k-reciprocal", k1=3, k2=2, candidates=6)
    expected = evaluate(gallery.embeddings(), gallery.labels, (1, 2), knn=rerank_knn(params))
    assert {key: saved[key] for key in expected} == pytest.approx(expected)
    # each query's saved results are the re-ranked lists, with their re-ranking scores
    saved_top = np.load(colors / "eval_queries.npz")
    reranked = Reranker(VectorSource.of_rows(gallery.embeddings()), params).search(
        gallery.embeddings(), 10, np.arange(15)
    )
    np.testing.assert_array_equal(saved_top["top_ids"], reranked[1])
    np.testing.assert_allclose(saved_top["top_scores"], reranked[0], atol=1e-6)
    assert not np.allclose(saved_top["top_scores"], evaluate_top_scores(gallery.embeddings()))
    assert main(["eval", "--index", str(colors)]) == 0
    assert json.loads((colors / "eval.json").read_text())["rerank"] == {"method": "none"}
    capsys.readouterr()


def evaluate_top_scores(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return -np.sort(-similarity, axis=1)[:, :10]


def test_sct_eval_refuses_bad_rerank_settings(colors, capsys):
    assert main(["eval", "--index", str(colors), "--rerank", "k-reciprocal", "--rerank-lambda", "2"]) == 2
    assert "lambda must be within 0..1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--index", str(colors), "--rerank", "rank-fusion"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["none", "k-reciprocal", "qe", "dba"])
def test_rerank_search_of_a_gallery_is_its_vectors_reranked(colors, method):
    gallery = Gallery.load(colors)
    queries = gallery.embeddings()[:3] * 0.9 + gallery.embeddings()[3:6] * 0.1
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    settings = {"k1": 3, "k2": 2, "n": 2} if method != "none" else {}
    scores, ids = rerank_search(gallery, queries, 4, method, **settings)
    params = RerankParams(method, **settings)
    expected = Reranker(VectorSource.of_rows(gallery.embeddings()), params).search(queries, 4)
    np.testing.assert_array_equal(ids, expected[1])
    np.testing.assert_allclose(scores, expected[0], atol=1e-5)
    with pytest.raises(UserValueError):
        rerank_search(gallery, queries, 0, method)
