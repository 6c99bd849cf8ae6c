"""Tampering and trust (issue 9): a gallery whose index, items and model disagree is refused at load with a
message naming both sides; no code path unpickles data; the server binds 127.0.0.1 unless told otherwise; and
no file path from a request reaches the filesystem: only gallery ids are accepted."""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import webapp.item_files
from benchmarks.fixtures.hostile_inputs import search_form
from benchmarks.fixtures.tiny_onnx import make_tiny_model
from benchmarks.load_test import build_color_gallery
from retrieval.embedder import file_sha256
from retrieval.gallery import Gallery, GalleryMismatchError
from webapp import cli, create_app

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("catalog", "retrieval", "webapp", "training", "sct")
DIM = 16  # build_color_gallery's tiny model: 32 px, 16-d


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    build_color_gallery(root, root / "colors", per_class=4)
    return root / "colors"


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    copy = tmp_path / "colors"
    shutil.copytree(pristine, copy)
    return copy


# --- tampered galleries --------------------------------------------------------------------------------------


def edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def drop_last_item(folder: Path) -> None:
    lines = (folder / "items.csv").read_text().splitlines(keepends=True)
    (folder / "items.csv").write_text("".join(lines[:-1]))


def add_an_item(folder: Path) -> None:
    with (folder / "items.csv").open("a") as items:
        items.write(f"{len((folder / 'items.csv').read_text().splitlines()) - 1},/etc/passwd,intruder\n")


def replace_index(
    folder: Path,
    *,
    count: int | None = None,
    dim: int = DIM,
    metric=faiss.METRIC_INNER_PRODUCT,
    id_map: type[faiss.Index] | None = None,
) -> None:
    original = faiss.read_index(str(folder / "index.faiss"))
    count = original.ntotal if count is None else count
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlat(dim, metric)
    if id_map is not None:
        index = id_map(index)
        index.add_with_ids(vectors, np.arange(1000, 1000 + count, dtype=np.int64))
    else:
        index.add(vectors)
    faiss.write_index(index, str(folder / "index.faiss"))


def replace_model(
    folder: Path, *, dim: int = DIM, seed: int = 1, declared_dim: int | None = None, update_manifest: bool = True
) -> None:
    """Another tiny model; ``declared_dim`` makes its metadata claim another width, with a symbolic output shape."""
    path = make_tiny_model(folder / "model.onnx", image_size=32, dim=dim, seed=seed)
    if declared_dim is not None:  # W and b become overridable inputs of width "d": no static output width
        model = onnx.load(path)
        model.graph.input.extend(
            [
                helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, "d"]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["d"]),
            ]
        )
        for output in model.graph.output:
            output.type.tensor_type.shape.dim[-1].dim_param = "d"
        for prop in model.metadata_props:
            if prop.key == "embedding_dim":
                prop.value = str(declared_dim)
        onnx.save(model, path)
    if update_manifest:
        edit_manifest(folder, model_sha256=file_sha256(path))


TAMPERING = {
    # name: (tamper, patterns the message must contain)
    "items.csv lost a row": (
        drop_last_item,
        ["count mismatch", "manifest.json count = 12", "index.faiss ntotal = 12", "items.csv rows = 11"],
    ),
    "items.csv gained a row": (add_an_item, ["count mismatch", "items.csv rows = 13"]),
    "manifest count edited": (
        lambda f: edit_manifest(f, count=20),
        ["count mismatch", "manifest.json count = 20", "index.faiss ntotal = 12"],
    ),
    "index.faiss has fewer vectors": (
        lambda f: replace_index(f, count=7),
        ["count mismatch", "index.faiss ntotal = 7"],
    ),
    "index.faiss has another dimension": (
        lambda f: replace_index(f, dim=8),
        ["embedding dimension mismatch", "manifest.json embedding_dim = 16", "index.faiss d = 8"],
    ),
    "manifest embedding_dim edited": (
        lambda f: edit_manifest(f, embedding_dim=32),
        ["embedding dimension mismatch", "manifest.json embedding_dim = 32", "index.faiss d = 16"],
    ),
    "index.faiss uses L2": (lambda f: replace_index(f, metric=faiss.METRIC_L2), ["metric"]),
    "index.faiss maps other ids": (
        lambda f: replace_index(f, id_map=faiss.IndexIDMap2),
        ["index.faiss maps other ids than the items of items.csv hold"],
    ),
    "index.faiss is an IndexIDMap": (
        lambda f: replace_index(f, id_map=faiss.IndexIDMap),
        ["is an IndexIDMap, which cannot read vectors back by id"],
    ),
    "model.onnx swapped": (
        lambda f: replace_model(f, update_manifest=False),
        ["model sha256 mismatch", "sha256 of model.onnx"],
    ),
    "manifest model_sha256 edited": (
        lambda f: edit_manifest(f, model_sha256="0" * 64),
        ["model sha256 mismatch", "manifest.json model_sha256 = " + "0" * 64],
    ),
    "model.onnx of another width": (
        lambda f: replace_model(f, dim=8),
        ["embedding dimension mismatch", "manifest.json embedding_dim = 16", "model.onnx embedding dim = 8"],
    ),
    "model.onnx claims 16 and outputs 24": (
        lambda f: replace_model(f, dim=24, declared_dim=16),
        [
            "embedding dimension mismatch",
            "model.onnx embedding dim = 16",
            "model.onnx embedding output width = 24",
            "model.onnx feature_map output width = 24",
        ],
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_a_tampered_gallery_is_refused_naming_the_mismatch(folder, tampering):
    tamper, patterns = TAMPERING[tampering]
    Gallery.load(folder)  # it loaded before
    tamper(folder)
    with pytest.raises(GalleryMismatchError) as error:
        Gallery.load(folder)
    message = str(error.value)
    for pattern in patterns:
        assert pattern in message, message
    with pytest.raises(GalleryMismatchError):  # and a server refuses to start on it
        create_app([folder])


# --- no unpickling ---------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}


def unsafe_deserialisation(source: str) -> list[str]:
    """The lines of ``source`` that can unpickle: torch.load without weights_only=True, np.load with
    allow_pickle, imports of pickle-like modules, pandas.read_pickle, yaml.load without SafeLoader."""
    findings = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            modules = names if isinstance(node, ast.Import) else [node.module or ""]
            if any(name.split(".")[0] in UNSAFE_MODULES for name in modules):
                findings.append(f"line {node.lineno}: imports {', '.join(modules)}")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy") and "load" in names:
                findings.append(f"line {node.lineno}: from {node.module} import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            call = f"{owner}.{node.func.attr}"
            if call == "torch.load" and not _is_constant(keywords.get("weights_only"), True):
                findings.append(f"line {node.lineno}: torch.load without weights_only=True")
            elif (
                call in ("np.load", "numpy.load")
                and "allow_pickle" in keywords
                and not _is_constant(keywords["allow_pickle"], False)
            ):
                findings.append(f"line {node.lineno}: {call} with allow_pickle")
            elif call in ("pd.read_pickle", "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load"):
                findings.append(f"line {node.lineno}: {call}")
            elif call == "yaml.load" and "SafeLoader" not in ast.unparse(keywords.get("Loader", ast.Constant(""))):
                findings.append(f"line {node.lineno}: yaml.load without SafeLoader")
    return findings


def _is_constant(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_no_source_file_can_unpickle():
    scanned, findings = 0, []
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            scanned += 1
            findings += [f"{path.relative_to(ROOT)} {finding}" for finding in unsafe_deserialisation(path.read_text())]
    assert scanned > 40
    assert findings == []


def test_the_unpickling_scan_catches_each_pattern():
    bad = (
        "import pickle\nimport marshal as m\nfrom joblib import load\nfrom torch import load\n"
        "torch.load(path)\ntorch.load(path, weights_only=False)\ntorch.load(path, map_location='cpu')\n"
        "np.load(path, allow_pickle=True)\nnumpy.load(path, allow_pickle=flag)\n"
        "pd.read_pickle(path)\nyaml.load(text)\nyaml.load(text, Loader=yaml.Loader)\nyaml.unsafe_load(text)\n"
    )
    assert len(unsafe_deserialisation(bad)) == 13
    good = (
        "torch.load(path, map_location='cpu', weights_only=True)\nnp.load(path)\n"
        "np.load(path, allow_pickle=False)\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\n"
    )
    assert unsafe_deserialisation(good) == []


# --- the server binds the loopback address by default ----------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sct")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_sct_serve_binds_127_0_0_1_by_default(pristine, monkeypatch):
    args = serve_parser().parse_args(["serve", "--index", str(pristine)])
    assert args.host == "127.0.0.1"
    bound = []
    monkeypatch.setattr("webapp.server.GunicornServer.run", lambda server: bound.append(server.cfg.bind))
    assert cli.serve(args) == 0
    assert bound == [["127.0.0.1:5000"]]
    args = serve_parser().parse_args(["serve", "--index", str(pristine), "--host", "0.0.0.0", "--port", "8080"])
    assert cli.serve(args) == 0 and bound[-1] == ["0.0.0.0:8080"]  # only when asked


# --- request paths never reach the filesystem --------------------------------------------------------------------

TRAVERSALS = [
    "/api/items/../../etc/passwd/image",
    "/api/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image",
    "/api/items/..%2F..%2Fsecret.txt/image",
    "/api/items//etc/passwd/image",
    "/api/items/%2Fetc%2Fpasswd/image",
    "/api/items/0%00/image",
    "/api/items/0%2500/image",
    "/api/items/-1/image",
    "/api/items/1e3/image",
    "/api/items/0x1/image",
    "/api/items/99999999999999999999999/image",
    "/api/items/0/image?index=../../etc",
    "/api/items/0/image?index=%2Fetc%2Fpasswd",
    "/api/items/0/image?index=colors%00",
    "/api/heatmap?query=QUERY&item=../../secret.txt",
    "/api/heatmap?query=QUERY&item=%2Fetc%2Fpasswd",
    "/api/heatmap?query=QUERY&item=0%00",
    "/api/heatmap?query=../../secret.txt&item=0",
    "/api/heatmap?query=QUERY&item=0&side=../../secret.txt",
    "/api/pair?query=QUERY&item=..%2F..%2Fsecret.txt",
    "/api/pair?query=QUERY&item=0&index=../colors",
    "/pair?query=QUERY&item=%2e%2e%2fsecret.txt",
    "/evaluation?index=../../secret.txt",
    "/api/evaluation/recall.png?index=..%2F..%2F",
    "/static/../../secret.txt",
    "/static/%2e%2e/%2e%2e/secret.txt",
    "/static/..%2f..%2fwebapp%2fapi.py",
]


@pytest.fixture
def spied(pristine, tmp_path, monkeypatch):
    """An app over the gallery, a secret file beside it, and the file paths that any handler opened."""
    (pristine.parent / "secret.txt").write_text("TOP-SECRET-MARKER")
    app = create_app([pristine])
    opened: list[Path] = []
    open_image_file = webapp.item_files.open_image_file  # the one opener of gallery files (images, heatmaps)
    monkeypatch.setattr(
        webapp.item_files,
        "open_image_file",
        lambda path, roots: opened.append(Path(path)) or open_image_file(path, roots),
    )
    client = app.test_client()
    item_files = {Path(item.path).resolve() for item in Gallery.load(pristine).items}
    request = search_form(Path(next(iter(item_files))).read_bytes(), k="2")
    query = client.post("/api/search", data=request.body, content_type=request.content_type).get_json()["query_id"]
    return {"client": client, "opened": opened, "item_files": item_files, "query": query}


@pytest.mark.parametrize("url", TRAVERSALS)
def test_a_path_in_a_request_never_reaches_the_filesystem(spied, url):
    response = spied["client"].get(url.replace("QUERY", spied["query"]))
    assert 400 <= response.status_code < 500, (url, response.status_code)
    assert b"TOP-SECRET-MARKER" not in response.get_data() and b"root:" not in response.get_data()
    assert {path.resolve() for path in spied["opened"]} <= spied["item_files"], spied["opened"]


def test_the_spy_sees_gallery_files_by_id(spied):
    """The positive control: a request by id opens that item's own file, and nothing else."""
    client = spied["client"]
    assert client.get("/api/items/0/image").status_code == 200
    assert client.get(f"/api/heatmap?query={spied['query']}&item=1").status_code == 200
    assert spied["opened"] and {path.resolve() for path in spied["opened"]} <= spied["item_files"]
