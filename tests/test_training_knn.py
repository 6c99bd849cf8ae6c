"""The torch exact kNN (Recall@K on the training GPU) against FAISS and a brute-force numpy ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.metrics import evaluate, knn_exclude_self
from training.knn import TorchKnn, knn_for


def unit_vectors(rng: np.random.Generator, count: int, dim: int = 24) -> np.ndarray:
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(gallery: np.ndarray, queries: np.ndarray, depth: int, query_ids=None):
    """float64 scores of every pair, ranked with a stable sort, the query's own row removed."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if query_ids is not None:
        scores[np.arange(len(queries)), query_ids] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("block_bytes", [1 << 30, 4 * 300 * 7])  # one block; blocks of 7 query rows
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_matches_faiss_and_brute_force(block_bytes, leave_one_out):
    rng = np.random.default_rng(3)
    gallery = unit_vectors(rng, 300)
    queries = gallery[:50] if leave_one_out else unit_vectors(rng, 50)
    query_ids = np.arange(50) if leave_one_out else None
    knn = TorchKnn("cpu", max_block_bytes=block_bytes)
    scores, ids = knn(gallery, queries, 10, query_ids=query_ids, chunk_size=16)
    faiss_scores, faiss_ids = knn_exclude_self(gallery, queries, 10, query_ids=query_ids)
    reference_scores, reference_ids = brute_force(gallery, queries, 10, query_ids)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (50, 10)
    assert ids.tolist() == faiss_ids.tolist() == reference_ids.tolist()
    assert np.allclose(scores, reference_scores, atol=1e-5) and np.allclose(scores, faiss_scores, atol=1e-5)
    if leave_one_out:
        assert not (ids == query_ids[:, None]).any()


def test_depth_beyond_the_gallery_returns_everything_but_the_query():
    rng = np.random.default_rng(4)
    gallery = unit_vectors(rng, 6)
    scores, ids = TorchKnn("cpu")(gallery, gallery, 50, query_ids=np.arange(6))
    assert ids.shape == (6, 5)
    assert all(sorted(row) == [j for j in range(6) if j != i] for i, row in enumerate(ids.tolist()))


def test_evaluate_gives_the_same_metrics_with_either_search():
    rng = np.random.default_rng(5)
    centres = unit_vectors(rng, 12)
    labels = rng.integers(0, 12, 400)
    embeddings = centres[labels] + 0.6 * rng.standard_normal((400, 24)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    gallery, gallery_labels = embeddings[:300], labels[:300]
    for kwargs in ({}, {"query_emb": embeddings[300:], "query_labels": labels[300:]}):
        with_faiss = evaluate(gallery, gallery_labels, ks=(1, 2, 4, 8), **kwargs, chunk_size=64)
        with_torch = evaluate(
            gallery,
            gallery_labels,
            ks=(1, 2, 4, 8),
            **kwargs,
            chunk_size=64,
            knn=TorchKnn("cpu", max_block_bytes=4 * 300 * 10),
        )
        assert with_torch == with_faiss
        assert 0.2 < with_torch["recall@1"] < 1.0  # neither trivial nor degenerate


def test_a_different_gallery_is_searched_not_the_cached_one():
    rng = np.random.default_rng(6)
    first, second, queries = unit_vectors(rng, 40), unit_vectors(rng, 40), unit_vectors(rng, 5)
    knn = TorchKnn("cpu")
    knn(first, queries, 3)
    assert knn(second, queries, 3)[1].tolist() == brute_force(second, queries, 3)[1].tolist()


def test_matmul_precision_is_restored_and_bad_shapes_are_refused():
    rng = np.random.default_rng(7)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        TorchKnn("cpu")(unit_vectors(rng, 10), unit_vectors(rng, 2), 3)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)
    with pytest.raises(ValueError, match="agree on d"):
        TorchKnn("cpu")(unit_vectors(rng, 10, dim=8), unit_vectors(rng, 2, dim=9), 3)
    with pytest.raises(ValueError, match="query ids"):
        TorchKnn("cpu")(unit_vectors(rng, 10), unit_vectors(rng, 2), 3, query_ids=np.arange(3))


def test_cpu_training_keeps_faiss():
    assert knn_for(torch.device("cpu")) is knn_exclude_self
    assert isinstance(knn_for(torch.device("cuda")), TorchKnn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_search_matches_faiss_on_a_realistic_size():
    rng = np.random.default_rng(8)
    gallery = unit_vectors(rng, 20_000, dim=128)
    scores, ids = TorchKnn("cuda")(gallery, gallery[:2000], 8, query_ids=np.arange(2000))
    faiss_scores, faiss_ids = knn_exclude_self(gallery, gallery[:2000], 8, query_ids=np.arange(2000))
    assert np.allclose(scores, faiss_scores, atol=1e-5)
    assert (ids == faiss_ids).mean() > 0.999  # only exact ties may order differently
