"""Distributed indexing: `sct index --workers / --shard / --merge`, and on-disk IVF galleries.

The sharded and multi-process paths must write the gallery a single
`sct index` writes; an on-disk IVF gallery must search like the in-memory IVF
index with the same quantizer, and be refused when its files disagree.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from benchmarks.fixtures.tiny_onnx import make_color_images, make_tiny_model
from catalog import load_rgb
from core.shards import ShardSpec
from retrieval import index_files
from retrieval.cli import INDEX_EPILOG
from retrieval.embedder import file_sha256
from retrieval.gallery import Gallery, GalleryItem, GalleryMismatchError, build_gallery
from retrieval.shards import merge_shards, write_shard
from tests.test_retrieval_cli import sct
from webapp import create_app

DIM = 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    model = make_tiny_model(root / "model.onnx", dim=DIM)
    make_color_images(root / "images", per_class=5)
    (root / "images" / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # image 10 of 16
    queries = make_color_images(root / "queries", per_class=2, seed=9)
    single = root / "single"
    assert sct(["index", "--model", str(model), "--images", str(root / "images"), "--out", str(single),
                "--batch-size", "4"]) == 0  # fmt: skip
    return {"root": root, "model": model, "images": root / "images", "queries": queries, "single": single}


def assert_same_gallery(built: Path, expected: Path, queries: list[Path]) -> None:
    """Same items.csv, same vectors (to float rounding), same search results as ``expected``."""
    assert (built / "items.csv").read_text() == (expected / "items.csv").read_text()
    ours, theirs = Gallery.load(built), Gallery.load(expected)
    assert ours.manifest | {"created": "", "history": ""} == theirs.manifest | {"created": "", "history": ""}
    assert np.allclose(ours.embeddings(), theirs.embeddings(), atol=1e-6)
    query_vectors = theirs.embedder.embed_images([load_rgb(path) for path in queries])
    our_scores, our_ids = ours.search(query_vectors, 5)
    their_scores, their_ids = theirs.search(query_vectors, 5)
    assert our_ids.tolist() == their_ids.tolist() and np.allclose(our_scores, their_scores, atol=1e-6)


def test_workers_write_the_single_process_gallery(workspace, tmp_path):
    out = tmp_path / "workers"
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["images"]), "--out", str(out),
                "--batch-size", "4", "--workers", "2"]) == 0  # fmt: skip
    assert_same_gallery(out, workspace["single"], workspace["queries"])


def test_shards_merge_into_the_single_process_gallery(workspace, tmp_path, capsys):
    shards = tmp_path / "shards"
    for index in range(3):
        assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
                    "--out", str(shards), "--shard", f"{index}/3", "--batch-size", "2"]) == 0  # fmt: skip
    folders = sorted(shards.iterdir())
    assert [f.name for f in folders] == [f"shard-0000{i}-of-00003" for i in range(3)]
    metas = [json.loads((folder / "shard.json").read_text()) for folder in folders]
    assert [(m["images"]["start"], m["images"]["stop"]) for m in metas] == [(0, 5), (5, 10), (10, 16)]
    assert [m["unreadable"] for m in metas] == [0, 0, 1] and "broken.jpg" in capsys.readouterr().err

    out = tmp_path / "merged"
    assert sct(["index", "--merge", *map(str, reversed(folders)), "--out", str(out)]) == 0  # ids follow shard order
    assert f"wrote {out}: 15 items" in capsys.readouterr().out
    assert sum(m["count"] for m in metas) == Gallery.load(out).manifest["count"] == 15
    assert_same_gallery(out, workspace["single"], workspace["queries"])

    single_ivf, merged_ivf = tmp_path / "single-ivf", tmp_path / "merged-ivf"
    ivf = ["--index-type", "ivf-flat", "--nlist", "3"]
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
                "--out", str(single_ivf), *ivf]) == 0  # fmt: skip
    assert sct(["index", "--merge", str(shards), "--out", str(merged_ivf), *ivf]) == 0  # the parent folder works too
    assert_same_gallery(merged_ivf, single_ivf, workspace["queries"])


def test_the_server_searches_an_ondisk_gallery_built_from_shards(workspace, tmp_path):
    for index in range(2):
        assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
                    "--out", str(tmp_path / "shards"), "--shard", f"{index}/2"]) == 0  # fmt: skip
    ondisk = tmp_path / "index_data" / "colors"
    assert sct(["index", "--merge", str(tmp_path / "shards"), "--out", str(ondisk), "--index-type", "ivf-flat",
                "--storage", "ondisk", "--nlist", "3", "--nprobe", "3"]) == 0  # all lists probed: exact  # fmt: skip
    client = create_app([ondisk]).test_client()
    single = Gallery.load(workspace["single"])
    for query in workspace["queries"]:
        response = client.post(
            "/api/search",
            data={"image": (io.BytesIO(query.read_bytes()), query.name), "k": "5"},
            content_type="multipart/form-data",
        )
        assert response.status_code == 200, response.get_json()
        _, expected = single.search(single.embedder.embed_images([load_rgb(query)]), 5)
        assert [result["id"] for result in response.get_json()["results"]] == expected[0].tolist()


def test_shard_env_takes_rank_and_world_size(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sct(["index", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
                "--out", str(tmp_path), "--shard", "env"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "shard-00001-of-00002" / "shard.json").read_text())["images"]["start"] == 8


def test_shard_specs():
    assert ShardSpec.parse("2/4") == ShardSpec(2, 4) and ShardSpec(2, 4).bounds(10) == (5, 7)
    assert ShardSpec.parse("env", {"RANK": "0", "WORLD_SIZE": "3"}) == ShardSpec(0, 3)
    assert [ShardSpec(i, 3).bounds(2) for i in range(3)] == [(0, 0), (0, 1), (1, 2)]  # more shards than images
    for text in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError, match="0 <= I < N"):
            ShardSpec.parse(text)
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        ShardSpec.parse("env", {"RANK": "0"})


def unit_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_unit_vectors(count: int, dim: int, *, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, so that an IVF index's recall means something."""
    rng = np.random.default_rng(seed)
    centres = unit_vectors(clusters, dim, seed=seed + 1000)
    vectors = centres[rng.integers(0, clusters, count)] + 0.15 * rng.standard_normal((count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_test_shards(
    parent: Path, vectors: np.ndarray, model: Path, count: int, *, only=None, sha="list-1"
) -> list[Path]:
    """Shards i/count of ``vectors`` (items named after their global row), as `sct index --shard` writes them."""
    folders = []
    for index in range(count) if only is None else only:
        shard = ShardSpec(index, count)
        start, stop = shard.bounds(len(vectors))
        items = [
            GalleryItem(local, f"img/{start + local}.jpg", f"class {(start + local) % 7}")
            for local in range(stop - start)
        ]
        folders.append(
            write_shard(
                parent,
                shard,
                vectors[start:stop],
                items,
                model,
                total_images=len(vectors),
                image_list_sha256=sha,
                dataset="synthetic",
                split="test",
                image_roots=[str(Path("img").resolve())],
            )
        )
    return folders


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx", dim=DIM)


def merge_error(shard_dirs: list[Path], out: Path, capsys) -> str:
    assert sct(["index", "--merge", *map(str, shard_dirs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not out.exists()
    return err


def test_merge_refuses_shards_that_do_not_belong_together(tmp_path, model, capsys):
    vectors = unit_vectors(30)
    good = write_test_shards(tmp_path / "good", vectors, model, 3)
    out = tmp_path / "gallery"

    other_model = make_tiny_model(tmp_path / "other" / "model.onnx", dim=DIM, seed=1)
    [other] = write_test_shards(tmp_path / "other-model", vectors, other_model, 3, only=[1])
    err = merge_error([good[0], other, good[2]], out, capsys)
    assert "disagree on the model sha256" in err and file_sha256(model) in err and file_sha256(other_model) in err

    narrow_model = make_tiny_model(tmp_path / "narrow" / "model.onnx", dim=4)
    [narrow] = write_test_shards(tmp_path / "narrow-shards", unit_vectors(30, dim=4), narrow_model, 3, only=[1])
    assert "disagree on the embedding dimension" in merge_error([good[0], narrow, good[2]], out, capsys)

    assert "shard 1/3 given twice" in merge_error([*good, good[1]], out, capsys)
    assert "missing shard(s) 1/3; given 0/3, 2/3" in merge_error([good[0], good[2]], out, capsys)
    [half] = write_test_shards(tmp_path / "halves", vectors, model, 2, only=[1])
    assert "disagree on the shard count N" in merge_error([*good, half], out, capsys)
    [relisted] = write_test_shards(tmp_path / "relisted", vectors, model, 3, only=[1], sha="list-2")
    assert "cut from different image lists" in merge_error([good[0], relisted, good[2]], out, capsys)
    assert "is not an index shard" in merge_error([tmp_path / "other"], out, capsys)

    make_tiny_model(good[1] / "model.onnx", dim=DIM, seed=2)  # a shard whose model was swapped after embedding
    assert "sha256 of model.onnx is" in merge_error(good, out, capsys)


def test_more_shards_than_images_and_a_gallery_over_its_shards(tmp_path, model):
    vectors = unit_vectors(2)
    shards = write_test_shards(tmp_path / "shards", vectors, model, 3)  # shard 0/3 holds no image
    assert Gallery.load(merge_shards(shards, tmp_path / "gallery")).embeddings().tolist() == vectors.tolist()
    for out in (tmp_path / "shards", shards[1]):
        with pytest.raises(ValueError, match="would replace the shards being merged"):
            merge_shards(shards, out)
    assert all((folder / "shard.json").is_file() for folder in shards)


def test_cli_refuses_options_that_do_not_apply(workspace, tmp_path, capsys):
    model, images, out = str(workspace["model"]), str(workspace["images"]), str(tmp_path / "x")
    cases = [
        (["--merge", str(tmp_path), "--model", model], "takes the model and images from the shards: drop --model"),
        (["--images", images, "--model", model, "--shard", "0/2", "--index-type", "hnsw"], "drop --index-type"),
        (["--images", images, "--model", model, "--storage", "ondisk"], "storage ondisk needs an ivf index type"),
        (["--images", images], "--model is required"),
        (["--images", images, "--model", model, "--shard", "2/2"], "0 <= I < N"),
    ]
    for argv, message in cases:
        assert sct(["index", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not Path(out).exists()


def test_help_shows_the_distributed_examples():
    for example in (
        "--workers 4",
        "--shard 0/2",
        "--shard env",
        "sct index --merge shards/sop/shard-*",
        "--index-type ivf-flat --storage ondisk",
    ):
        assert example in INDEX_EPILOG


@pytest.fixture
def ondisk_parts(tmp_path, model, single_thread_faiss):
    """(folder, vectors) of an on-disk IVF gallery merged from 3 shards of the vectors."""
    vectors = clustered_unit_vectors(3000, DIM)
    shards = write_test_shards(tmp_path / "shards", vectors, model, 3)
    out = merge_shards(shards, tmp_path / "gallery", index_type="ivf-flat", storage="ondisk", nlist=16, nprobe=4)
    return out, vectors


def test_ondisk_gallery_searches_like_the_in_memory_index_with_its_quantizer(ondisk_parts, tmp_path):
    out, vectors = ondisk_parts
    assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "index.ivfdata", "items.csv", "manifest.json",
                                                     "model.onnx"]  # fmt: skip
    assert sorted(p.name for p in out.parent.iterdir()) == ["gallery", "shards"]  # no staging or part files left
    assert b".tmp-" not in (out / "index.faiss").read_bytes()  # the lists' file is named without the staging folder
    gallery = Gallery.load(out)
    assert gallery.manifest["storage"] == "ondisk" and gallery.manifest["ivfdata_file"] == "index.ivfdata"
    assert gallery.manifest["count"] == 3000 and gallery.items[1234].path == "img/1234.jpg"
    lists = index_files.ondisk_lists(gallery.index)
    assert lists.read_only and Path(lists.filename) == out / "index.ivfdata"

    trained = faiss.extract_index_ivf(gallery.index)
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(trained.quantizer.reconstruct_n(0, trained.nlist))
    in_memory = faiss.IndexIVFFlat(quantizer, DIM, trained.nlist, faiss.METRIC_INNER_PRODUCT)
    in_memory.is_trained = True
    in_memory.add(vectors)
    in_memory.nprobe = trained.nprobe
    queries = clustered_unit_vectors(200, DIM, seed=7)
    scores, ids = gallery.search(queries, 10)
    expected_scores, expected_ids = in_memory.search(queries, 10)
    assert ids.tolist() == expected_ids.tolist() and np.allclose(scores, expected_scores, atol=1e-6)
    assert np.array_equal(gallery.embeddings(), vectors)

    exact = np.argsort(-(vectors @ vectors.T), axis=1)[:, :10]  # every gallery vector as a query, numpy only
    _, approximate = gallery.search(vectors, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate.tolist(), exact.tolist())])
    assert recall > 0.8 and abs(gallery.manifest["recall_at_10_vs_exact"] - recall) < 0.05

    moved = tmp_path / "elsewhere" / "moved"  # the lists are found next to index.faiss, wherever the folder goes
    moved.parent.mkdir()
    os.rename(out, moved)
    assert Gallery.load(moved).search(queries, 10)[1].tolist() == ids.tolist()


@pytest.mark.usefixtures("single_thread_faiss")
def test_ondisk_ivf_pq_and_single_process_builds(tmp_path, model):
    vectors = clustered_unit_vectors(2000, DIM)
    items = [GalleryItem(i, f"{i}.jpg", "x") for i in range(2000)]
    folders = {
        index_type: build_gallery(
            tmp_path / index_type,
            vectors,
            items,
            model,
            dataset="d",
            split="s",
            index_type=index_type,
            storage="ondisk",
            nlist=8,
        )
        for index_type in ("ivf-flat", "ivf-pq")
    }
    pq = Gallery.load(folders["ivf-pq"])
    assert pq.manifest["faiss_factory"].startswith("IVF8,PQ") and index_files.ondisk_lists(pq.index) is not None
    assert np.mean(np.sum(pq.embeddings() * vectors, axis=1)) > 0.8  # lossy, but close
    # one array or its shards: the same on-disk index
    sharded = merge_shards(
        write_test_shards(tmp_path / "shards", vectors, model, 2),
        tmp_path / "sharded",
        index_type="ivf-flat",
        storage="ondisk",
        nlist=8,
    )
    queries = clustered_unit_vectors(50, DIM, seed=3)
    assert (
        Gallery.load(sharded).search(queries, 10)[1].tolist()
        == Gallery.load(folders["ivf-flat"]).search(queries, 10)[1].tolist()
    )


def test_tampered_ondisk_galleries_are_refused(ondisk_parts, model):
    out, _ = ondisk_parts
    pristine = {p.name: p.read_bytes() for p in out.iterdir()}

    def restore():
        for name, data in pristine.items():
            (out / name).write_bytes(data)

    (out / "index.ivfdata").unlink()
    with pytest.raises(FileNotFoundError, match="lacks index.ivfdata"):
        Gallery.load(out)
    restore()
    with open(out / "index.ivfdata", "r+b") as file:  # a cut-short file would crash a reader (SIGBUS) if mapped
        file.truncate(len(pristine["index.ivfdata"]) // 2)
    with pytest.raises(GalleryMismatchError, match=r"index.ivfdata is [\d,]+ bytes, index.faiss expects"):
        Gallery.load(out)
    restore()
    lines = pristine["items.csv"].decode().splitlines(keepends=True)
    (out / "items.csv").write_text("".join(lines[:-1]))
    with pytest.raises(GalleryMismatchError, match=r"count mismatch.*ivfdata vectors = 3000.*items.csv rows = 2999"):
        Gallery.load(out)
    restore()
    manifest = json.loads(pristine["manifest.json"])
    for changes, message in [
        ({"count": 3001}, r"count mismatch.*manifest.json count = 3001"),
        ({"embedding_dim": 16}, "dimension mismatch"),
        ({"ivfdata_file": "../index.ivfdata"}, "ivfdata_file must name a file of the gallery folder"),
        ({"ivfdata_file": "items.csv"}, "keeps its inverted lists in index.ivfdata, not items.csv"),
        ({"storage": "memory"}, "index.faiss"),
        ({"storage": "tape"}, "storage is 'tape'"),
    ]:
        (out / "manifest.json").write_text(json.dumps(manifest | changes))
        with pytest.raises(GalleryMismatchError, match=message):
            Gallery.load(out)
    restore()
    make_tiny_model(out / "model.onnx", dim=DIM, seed=3)
    with pytest.raises(GalleryMismatchError, match="model sha256 mismatch"):
        Gallery.load(out)
    restore()
    Gallery.load(out)


def test_galleries_without_a_storage_field_still_load(tmp_path, model):
    out = build_gallery(
        tmp_path / "old",
        unit_vectors(20),
        [GalleryItem(i, f"{i}.jpg", "x") for i in range(20)],
        model,
        dataset="d",
        split="s",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("storage") == "memory"
    (out / "manifest.json").write_text(json.dumps(manifest))  # as written before on-disk storage existed
    assert Gallery.load(out).manifest["count"] == 20


@pytest.mark.usefixtures("single_thread_faiss")
def test_a_merged_gallery_appears_only_when_complete(tmp_path, model, monkeypatch):
    vectors = clustered_unit_vectors(600, DIM)
    shards = write_test_shards(tmp_path / "shards", vectors, model, 2)
    out = tmp_path / "gallery"
    seen = []
    real_merge = index_files.merge_ondisk

    def watched_merge(*args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real_merge(*args, **kwargs)

    monkeypatch.setattr(index_files, "merge_ondisk", watched_merge)
    merge_shards(shards, out, index_type="ivf-flat", storage="ondisk", nlist=4)
    assert "gallery" not in seen[0] and any(name.startswith(".gallery.tmp-") for name in seen[0])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def merge_then_fail(*args, **kwargs):
        real_merge(*args, **kwargs)
        raise RuntimeError("killed while merging")

    monkeypatch.setattr(index_files, "merge_ondisk", merge_then_fail)
    with pytest.raises(RuntimeError, match="killed while merging"):
        merge_shards(shards[::-1], out, index_type="ivf-flat", storage="ondisk", nlist=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous gallery, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "shards"]  # no staging folder left

    monkeypatch.setattr(index_files, "merge_ondisk", real_merge)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match=r"cannot write gallery .*unchanged.*need [\d,]+ bytes, 100 are free"):
        merge_shards(shards, out, index_type="ivf-flat", storage="ondisk", nlist=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
