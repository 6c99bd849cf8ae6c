"""``evaluate_gallery`` on a small gallery with chains, checked against numpy; eval.json and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import load_rgb
from retrieval.embedder import OnnxEmbedder
from retrieval.evaluation import evaluate_gallery, format_table, save_eval
from retrieval.gallery import Gallery, GalleryItem, GalleryMismatchError, build_gallery
from retrieval.query_results import QueryResults

CHAINS = {"red": "warm", "green": "cool", "blue": "cool"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    model = make_tiny_model(root / "model.onnx")
    paths = make_color_images(root / "images", per_class=3)
    embeddings = OnnxEmbedder(model).embed_images([load_rgb(path) for path in paths])
    items = [GalleryItem(i, str(p), p.parent.name, CHAINS[p.parent.name]) for i, p in enumerate(paths)]
    items[0] = GalleryItem(0, items[0].path, "lonely", "warm")  # no other item has its label: skipped
    directory = build_gallery(root / "g", embeddings, items, model, dataset="synthetic", split="test")
    queries = make_color_images(root / "queries", per_class=1, seed=4)
    return {"root": root, "gallery": Gallery.load(directory), "embeddings": embeddings, "queries": queries}


def recall_at(similarities: np.ndarray, query_labels, gallery_labels, k: int) -> float:
    top = np.argsort(-similarities, axis=1)[:, :k]
    return float(np.mean([(np.asarray(gallery_labels)[row] == label).any() for row, label in zip(top, query_labels)]))


def test_leave_one_out_with_chains(setup):
    gallery, embeddings = setup["gallery"], setup["embeddings"]
    results = evaluate_gallery(gallery, ks=(1, 2))
    assert (results["mode"], results["gallery"], results["ks"]) == ("leave-one-out", "g", [1, 2])
    assert (results["queries"], results["skipped"]) == (8, 1)
    assert (results["chain_queries"], results["chain_skipped"]) == (9, 0)
    similarities = embeddings @ embeddings.T
    np.fill_diagonal(similarities, -np.inf)
    labels, chains = gallery.labels, gallery.chains
    evaluated = np.arange(1, 9)
    assert results["recall@1"] == pytest.approx(recall_at(similarities[evaluated], labels[evaluated], labels, 1))
    for k in (1, 3, 5):
        assert results[f"chain_recall@{k}"] == pytest.approx(recall_at(similarities, chains, chains, k))
    table = format_table(results)
    assert table.splitlines()[0] == "g (leave-one-out, Flat)"
    assert "chain_recall@5" in table and "skipped" in table


def test_query_tuples_with_chains_and_an_unreadable_query(setup):
    gallery = setup["gallery"]
    queries = [(str(p), p.parent.name, CHAINS[p.parent.name]) for p in setup["queries"]]
    queries.append((str(setup["root"] / "missing.png"), "red", "warm"))
    results = evaluate_gallery(gallery, ks=(1,), queries=queries, progress=False)
    assert results["mode"] == "queries" and results["queries"] == 3 and results["chain_queries"] == 3
    assert results["unreadable_queries"] == [{"path": queries[-1][0], "reason": "file not found"}]
    query_embeddings = gallery.embedder.embed_images([load_rgb(p) for p in setup["queries"]])
    similarities = query_embeddings @ setup["embeddings"].T
    expected = recall_at(similarities, [q[1] for q in queries[:3]], gallery.labels, 1)
    assert results["recall@1"] == pytest.approx(expected)
    assert "unreadable queries" in format_table(results)


def test_save_eval_and_a_foreign_embedder(setup, tmp_path):
    gallery = setup["gallery"]
    results = evaluate_gallery(gallery, ks=(1,))
    path = save_eval(results, tmp_path / "out" / "eval.json")
    assert json.loads(path.read_text()) == results
    other = OnnxEmbedder(make_tiny_model(tmp_path / "other.onnx", seed=7))
    with pytest.raises(GalleryMismatchError, match="sha256 mismatch"):
        evaluate_gallery(gallery, queries=[(str(setup["queries"][0]), "red")], embedder=other)


def test_queries_of_hotels_outside_any_chain_are_left_out_of_chain_recall(setup):
    """Hotels-50K's own evaluation treats chain id -1 as "no chain": such queries get no chain score."""
    gallery = setup["gallery"]
    queries = [(str(p), p.parent.name, CHAINS[p.parent.name]) for p in setup["queries"]]
    queries[0] = (queries[0][0], queries[0][1], "-1")
    results = evaluate_gallery(gallery, ks=(1,), queries=queries, progress=False)
    assert (results["queries"], results["chain_queries"], results["chain_skipped"]) == (3, 2, 1)
    query_embeddings = gallery.embedder.embed_images([load_rgb(p) for p in setup["queries"][1:]])
    similarities = query_embeddings @ setup["embeddings"].T
    expected = recall_at(similarities, [q[2] for q in queries[1:]], gallery.chains, 1)
    assert results["chain_recall@1"] == pytest.approx(expected)


@pytest.mark.parametrize("with_queries", [False, True])
def test_per_query_results_come_with_the_same_metrics(setup, with_queries):
    gallery = setup["gallery"]
    queries = [(str(p), p.parent.name, CHAINS[p.parent.name]) for p in setup["queries"]] if with_queries else None
    plain = evaluate_gallery(gallery, ks=(1, 2), queries=queries, progress=False)
    results, per_query = evaluate_gallery(gallery, ks=(1, 2), queries=queries, progress=False, per_query_top=3)
    drop = ("created",)
    assert {k: v for k, v in results.items() if k not in drop} == {k: v for k, v in plain.items() if k not in drop}
    assert "chain_recall@5" in results  # the chains are still scored
    assert isinstance(per_query, QueryResults) and len(per_query) == results["queries"]
    assert per_query.mode == results["mode"] and per_query.model_sha256 == gallery.manifest["model_sha256"]
    assert per_query.top_ids.shape == (results["queries"], 3)
    if with_queries:
        assert (per_query.query_item == -1).all()
        assert [p.decode() for p in per_query.query_path] == [q[0] for q in queries]
    else:
        assert per_query.query_item.tolist() == list(range(1, 9))  # item 0 ("lonely") is skipped
        assert per_query.query_path.shape == (0,)
    assert [per_query.label_of(i) for i in range(len(per_query))] == (
        [q[1] for q in queries] if with_queries else gallery.labels[1:].tolist()
    )
