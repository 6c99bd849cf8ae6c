"""Gallery folders: build → load → search round trip, mismatch detection, atomic replacement, index types."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_tiny_model
from core.atomic import atomic_directory, atomic_file, atomic_write_text
from retrieval.embedder import file_sha256
from retrieval.gallery import Gallery, GalleryItem, GalleryMismatchError, build_gallery

DIM = 8


def unit_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_items(count: int, chains: bool = False) -> list[GalleryItem]:
    return [
        GalleryItem(id=i, path=f"/data/img,{i}.jpg", label=f"class {i % 7}", chain=f"chain{i % 3}" if chains else None)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx", dim=DIM)


@pytest.fixture
def built(tmp_path, model) -> tuple[Path, np.ndarray]:
    embeddings = unit_vectors(60)
    directory = build_gallery(tmp_path / "g", embeddings, make_items(60), model, dataset="synthetic", split="test")
    return directory, embeddings


def test_round_trip_search_matches_brute_force(tmp_path, model):
    embeddings = unit_vectors(60)
    items = make_items(60, chains=True)
    directory = build_gallery(tmp_path / "g", embeddings, items, model, dataset="synthetic", split="test")
    assert sorted(p.name for p in directory.iterdir()) == ["index.faiss", "items.csv", "manifest.json", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no temporary folder left behind
    gallery = Gallery.load(directory)
    assert gallery.name == "g" and gallery.items == items
    assert gallery.labels.tolist() == [item.label for item in items]
    assert gallery.chains.tolist() == [item.chain for item in items]
    manifest = gallery.manifest
    assert manifest["count"] == 60 and manifest["embedding_dim"] == DIM and manifest["metric"] == "inner_product"
    assert manifest["model_sha256"] == file_sha256(model) and manifest["faiss_factory"] == "Flat"
    assert (manifest["dataset"], manifest["split"]) == ("synthetic", "test")

    queries = unit_vectors(5, seed=1)
    scores, ids = gallery.search(queries, k=7)
    similarities = queries.astype(np.float64) @ embeddings.T.astype(np.float64)
    expected_ids = np.argsort(-similarities, axis=1)[:, :7]
    assert ids.dtype == np.int64 and ids.tolist() == expected_ids.tolist()
    assert np.allclose(scores, np.take_along_axis(similarities, expected_ids, axis=1), atol=1e-6)
    assert gallery.search(queries, k=100)[1].shape == (5, 60)  # k is capped at the gallery size
    assert np.array_equal(gallery.embeddings(), embeddings)
    with pytest.raises(ValueError, match="shape"):
        gallery.search(unit_vectors(2, dim=4), k=3)


def test_items_without_chain_have_no_chain_column(built):
    directory, _ = built
    with open(directory / "items.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["id", "path", "label"] and rows[1] == ["0", "/data/img,0.jpg", "class 0"]
    assert Gallery.load(directory).chains is None


def rewrite_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_count_mismatch_names_both_counts(built):
    directory, _ = built
    lines = (directory / "items.csv").read_text().splitlines(keepends=True)
    (directory / "items.csv").write_text("".join(lines[:-1]))
    with pytest.raises(GalleryMismatchError, match=r"count mismatch.*items.csv rows = 59") as error:
        Gallery.load(directory)
    assert "index.faiss ntotal = 60" in str(error.value) and "manifest.json count = 60" in str(error.value)


def test_dimension_mismatch_with_the_model_names_both_dimensions(built):
    directory, _ = built
    make_tiny_model(directory / "model.onnx", dim=4)
    rewrite_manifest(directory, model_sha256=file_sha256(directory / "model.onnx"))
    expected = r"dimension mismatch.*embedding_dim = 8.*model.onnx embedding dim = 4"
    with pytest.raises(GalleryMismatchError, match=expected):
        Gallery.load(directory)


def test_dimension_mismatch_with_the_index(built):
    directory, _ = built
    rewrite_manifest(directory, embedding_dim=16)
    with pytest.raises(GalleryMismatchError, match=r"dimension mismatch.*embedding_dim = 16.*index.faiss d = 8"):
        Gallery.load(directory)


def test_model_sha_mismatch_names_both_hashes(built, model):
    directory, _ = built
    make_tiny_model(directory / "model.onnx", dim=DIM, seed=1)
    with pytest.raises(GalleryMismatchError, match="sha256 mismatch") as error:
        Gallery.load(directory)
    assert file_sha256(model) in str(error.value) and file_sha256(directory / "model.onnx") in str(error.value)


def test_format_version_and_missing_files_are_reported(built, tmp_path):
    directory, _ = built
    rewrite_manifest(directory, format_version=99)
    with pytest.raises(GalleryMismatchError, match="format_version is 99"):
        Gallery.load(directory)
    (directory / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        Gallery.load(directory)
    with pytest.raises(FileNotFoundError, match="gallery folder not found"):
        Gallery.load(tmp_path / "nowhere")


def test_corrupt_index_and_items_are_mismatches(built):
    directory, _ = built
    items = (directory / "items.csv").read_text()
    (directory / "items.csv").write_text("id,path,label\n0,a.jpg,x\n0,b.jpg,y\n")
    with pytest.raises(GalleryMismatchError, match="items.csv line 3"):
        Gallery.load(directory)
    (directory / "items.csv").write_text(items)
    (directory / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(GalleryMismatchError, match="not a readable FAISS index"):
        Gallery.load(directory)


def test_failed_rebuild_keeps_the_previous_gallery(built, tmp_path):
    directory, embeddings = built
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    wrong_model = make_tiny_model(tmp_path / "other" / "model.onnx", dim=4)  # disagrees with 8-d embeddings
    with pytest.raises(GalleryMismatchError, match="dimension mismatch"):
        build_gallery(directory, unit_vectors(30), make_items(30), wrong_model, dataset="synthetic", split="test")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "other"]  # no temporary folder left behind
    assert Gallery.load(directory).manifest["count"] == 60


def test_successful_rebuild_replaces_the_whole_folder(built, model):
    directory, _ = built
    (directory / "eval.json").write_text("{}")  # belongs to the old gallery
    build_gallery(directory, unit_vectors(10, seed=3), make_items(10), model, dataset="synthetic", split="test")
    assert not (directory / "eval.json").exists()
    assert Gallery.load(directory).manifest["count"] == 10
    assert [p.name for p in directory.parent.iterdir()] == ["g"]


def test_atomic_directory_keeps_old_contents_when_interrupted(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_directory(final) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with atomic_directory(final) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (final / "sub" / "new.txt").read_text() == "new" and not (final / "old.txt").exists()


def test_atomic_write_text_replaces_or_leaves_untouched(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_file(path) as temporary:
            temporary.write_text("half of thr")
            raise RuntimeError("midway")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.usefixtures("single_thread_faiss")
@pytest.mark.parametrize(
    ("index_type", "factory_prefix", "min_recall"),
    [("ivf-flat", "IVF", 0.5), ("ivf-pq", "IVF", 0.2), ("hnsw", "HNSW32", 0.9)],
)
def test_approximate_indexes_build_and_report_recall(tmp_path, model, index_type, factory_prefix, min_recall):
    count = 2000
    embeddings = unit_vectors(count, seed=5)
    directory = build_gallery(
        tmp_path / index_type, embeddings, make_items(count), model, dataset="synthetic", split="test",
        index_type=index_type,
    )  # fmt: skip
    gallery = Gallery.load(directory)
    manifest = gallery.manifest
    assert manifest["index_type"] == index_type and manifest["faiss_factory"].startswith(factory_prefix)
    reported = manifest["recall_at_10_vs_exact"]
    queries = embeddings[::4]
    _, approximate = gallery.search(queries, 10)
    exact = np.argsort(-(queries @ embeddings.T), axis=1)[:, :10]
    measured = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate.tolist(), exact.tolist())])
    assert min_recall <= measured and abs(reported - measured) < 0.05
    stored = gallery.embeddings()
    assert stored.shape == embeddings.shape
    if index_type == "ivf-pq":
        assert reported < 1.0 and np.mean(np.sum(stored * embeddings, axis=1)) > 0.8  # lossy, but close
    else:
        assert np.array_equal(stored, embeddings)


def test_bad_build_arguments_are_rejected(tmp_path, model):
    with pytest.raises(ValueError, match="unit vectors"):
        build_gallery(tmp_path / "g", 2 * unit_vectors(5), make_items(5), model, dataset="d", split="s")
    with pytest.raises(ValueError, match="row 1 has id 7"):
        items = [GalleryItem(0, "a", "x"), GalleryItem(7, "b", "y")]
        build_gallery(tmp_path / "g", unit_vectors(2), items, model, dataset="d", split="s")
    with pytest.raises(ValueError, match="unknown index type"):
        build_gallery(tmp_path / "g", unit_vectors(5), make_items(5), model, dataset="d", split="s", index_type="lsh")
    with pytest.raises(ValueError, match="nlist"):
        build_gallery(tmp_path / "g", unit_vectors(5), make_items(5), model, dataset="d", split="s", nlist=4)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("index_type,storage", [("flat", "memory"), ("hnsw", "memory"), ("ivf-flat", "ondisk")])
def test_stored_vectors_read_slices_and_ids_and_evaluation_streams_them(
    tmp_path, model, monkeypatch, index_type, storage
):
    import retrieval.metrics as metrics
    from retrieval.evaluation import evaluate_gallery
    from retrieval.metrics import evaluate

    embeddings = unit_vectors(600)
    ivf = {"nlist": 4, "nprobe": 4} if index_type.startswith("ivf") else {}
    directory = build_gallery(
        tmp_path / "g",
        embeddings,
        make_items(600),
        model,
        dataset="synthetic",
        split="test",
        index_type=index_type,
        storage=storage,
        **ivf,
    )
    gallery = Gallery.load(directory)
    vectors = gallery.vectors()
    assert vectors.shape == (600, DIM) and len(vectors) == 600
    assert np.allclose(vectors[:], embeddings, atol=1e-6)  # flat-storage types keep the vectors exactly
    assert np.array_equal(vectors[100:250], vectors[:][100:250]) and vectors[598:900].shape == (2, DIM)
    ids = np.array([5, 599, 0, 5])
    assert np.allclose(vectors[ids], embeddings[ids], atol=1e-6)
    with pytest.raises(IndexError):
        vectors[np.array([600])]
    expected = evaluate(embeddings, gallery.labels, (1, 2, 4))
    monkeypatch.setattr(metrics, "GALLERY_BLOCK_BYTES", 4 * DIM * 64)  # 10 blocks of 64 rows
    results = evaluate_gallery(gallery, ks=(1, 2, 4), progress=False)
    assert {key: results[key] for key in expected} == expected
