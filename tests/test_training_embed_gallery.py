"""``sct embed``: torch-embedded shards merge into the gallery ``sct index`` builds with the ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from catalog import ImageRecord
from retrieval.gallery import ITEMS_FILE, Gallery
from sct.cli import main
from training.config import resolve_config
from training.data import embed_records, embed_records_kept
from training.export import export_onnx
from training.model import EmbeddingNet
from training.trainer import preprocessing_of
from training.transforms import eval_transform

DIM, SIZE = 16, 32
CLASSES = {"a_red": (210, 40, 40), "b_green": (40, 190, 60), "c_blue": (40, 60, 200)}


def _write_images(root: Path) -> None:
    """Four images per class of differing sizes, and a corrupt file listed first (the check must skip it)."""
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i, (height, width) in enumerate([(36, 36), (40, 52), (60, 34), (28, 30)]):
            pixels = np.clip(np.array(colour) + rng.integers(-60, 61, size=(height, width, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "a_red" / "0-broken.jpg").write_bytes(b"\xff\xd8\xff garbage")


def _save_checkpoint(path: Path, *, seed: int, **overrides) -> Path:
    """A checkpoint in the trainer's format ({"model": state dict, "config": config dict, ...})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        arch="resnet18", dim=DIM, image_size=SIZE, pretrained="none", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]
    )
    config = resolve_config("folder", "unused", str(path.parent), overrides={**settings, **overrides})
    torch.manual_seed(seed)
    model = EmbeddingNet(config.arch, config.dim, config.embedding_bn)
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    _write_images(root / "images")
    checkpoint = _save_checkpoint(root / "run" / "best.pt", seed=0)
    export_onnx(checkpoint, root / "run" / "model.onnx")
    return {"root": root, "images": root / "images", "checkpoint": checkpoint, "model": root / "run" / "model.onnx"}


@pytest.fixture(scope="module")
def onnx_gallery(work) -> Path:
    out = work["root"] / "index_data" / "onnx"
    assert main(["index", "--model", str(work["model"]), "--images", str(work["images"]), "--out", str(out)]) == 0
    return out


def _embed(work, out: Path, *extra: str) -> int:
    return main(
        [
            "embed",
            "--checkpoint",
            str(work["checkpoint"]),
            "--model",
            str(work["model"]),
            "--images",
            str(work["images"]),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--batch-size",
            "5",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def torch_gallery(work) -> Path:
    shards, out = work["root"] / "shards" / "one", work["root"] / "index_data" / "torch"
    assert _embed(work, shards, "--workers", "1") == 0  # a decoding process: the failures cross a pickle
    assert main(["index", "--merge", str(shards), "--out", str(out)]) == 0
    return out


def test_one_shard_merges_into_the_gallery_sct_index_builds(work, onnx_gallery, torch_gallery, capsys) -> None:
    expected, got = Gallery.load(onnx_gallery), Gallery.load(torch_gallery)
    assert (torch_gallery / ITEMS_FILE).read_text() == (onnx_gallery / ITEMS_FILE).read_text()
    assert len(got.items) == 12 and all("broken" not in item.path for item in got.items)
    assert got.manifest["model_sha256"] == expected.manifest["model_sha256"]
    assert np.abs(got.embeddings() - expected.embeddings()).max() <= 1e-4
    queries = expected.embeddings()[[0, 5, 11]]
    assert np.array_equal(got.search(queries, 5)[1], expected.search(queries, 5)[1])


def test_embed_reports_the_check_the_skipped_image_and_the_merge_command(work, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert _embed(work, tmp_path / "shards", "--workers", "0") == 0
    captured = capsys.readouterr()
    assert "skipped unreadable image" in captured.err and "0-broken.jpg" in captured.err
    assert "skipped 1 unreadable image(s)" in captured.err
    cosine = float(captured.err.split("minimum cosine ")[1].split()[0])
    assert 0.999 <= cosine <= 1.0001
    assert f"wrote shard 0/1 to {tmp_path / 'shards' / 'shard-00000-of-00001'}: 12 items" in captured.out
    assert "images/s" in captured.out and f"sct index --merge {tmp_path / 'shards'} --out GALLERY" in captured.out


def test_two_shards_merge_into_the_same_gallery(work, torch_gallery, tmp_path, monkeypatch) -> None:
    shards, out = tmp_path / "shards", tmp_path / "gallery"
    assert _embed(work, shards, "--shard", "0/2", "--workers", "0") == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: --shard defaults to env
    assert _embed(work, shards, "--workers", "0") == 0
    assert sorted(p.name for p in shards.iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert main(["index", "--merge", str(shards), "--out", str(out)]) == 0
    assert (out / ITEMS_FILE).read_text() == (torch_gallery / ITEMS_FILE).read_text()
    assert np.abs(Gallery.load(out).embeddings() - Gallery.load(torch_gallery).embeddings()).max() <= 1e-5


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"seed": 1}, "cosine"),
        ({"seed": 0, "mean": [0.485, 0.456, 0.406]}, "preprocessing"),
        ({"seed": 0, "dim": 8}, "embedding size"),
    ],
)
def test_a_checkpoint_that_is_not_the_onnx_models_is_refused(work, tmp_path, capsys, overrides, says) -> None:
    other = _save_checkpoint(tmp_path / "other" / "best.pt", **overrides)
    out = tmp_path / "shards"
    status = main(
        [
            "embed",
            "--checkpoint",
            str(other),
            "--model",
            str(work["model"]),
            "--images",
            str(work["images"]),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--workers",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert err.startswith(f"error: {other} is not the model {work['model']} was exported from: ")
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_cosine_check_uses_its_threshold(work, tmp_path, capsys, monkeypatch) -> None:
    import training.embed_gallery as embed_gallery

    monkeypatch.setattr(embed_gallery, "FP32_MIN_COSINE", 1.5)  # no cosine reaches it
    assert _embed(work, tmp_path / "shards", "--workers", "0") == 2
    err = capsys.readouterr().err
    assert "cosine" in err and str(work["images"]) in err and not (tmp_path / "shards").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--checkpoint", "{root}/missing.pt"], "missing.pt does not exist"),
        (["--model", "{root}/missing.onnx"], "missing.onnx does not exist"),
        (["--split", "test"], "--data-root and --split go with --dataset, not --images"),
        (["--shard", "2/2"], "a shard is I/N with 0 <= I < N"),
        (["--images", "{root}/nowhere"], "image folder not found"),
    ],
)
def test_bad_input_is_one_line_and_status_2(work, tmp_path, capsys, argv, says) -> None:
    options = {"--checkpoint": str(work["checkpoint"]), "--model": str(work["model"]), "--images": str(work["images"])}
    extra = []
    for flag, value in zip(argv[::2], argv[1::2]):
        value = value.format(root=tmp_path)
        if flag in options:
            options[flag] = value
        else:
            extra += [flag, value]
    out = tmp_path / "shards"
    status = main(
        [
            "embed",
            *[part for pair in options.items() for part in pair],
            "--out",
            str(out),
            "--device",
            "cpu",
            "--workers",
            "0",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1
    assert not out.exists()


def test_dataset_needs_data_root_and_only_readable_images_are_indexed(work, tmp_path, capsys) -> None:
    common = [
        "embed",
        "--checkpoint",
        str(work["checkpoint"]),
        "--model",
        str(work["model"]),
        "--out",
        str(tmp_path / "shards"),
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    assert main([*common, "--dataset", "folder"]) == 2
    assert "--dataset needs --data-root" in capsys.readouterr().err
    broken = tmp_path / "broken" / "x"
    broken.mkdir(parents=True)
    (broken / "a.jpg").write_bytes(b"not an image")
    assert main([*common, "--images", str(broken.parent)]) == 2
    assert "none of the images could be read" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(work, tmp_path, capsys) -> None:
    assert _embed(work, tmp_path / "shards", "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Examples:" in out
    assert "sct embed --checkpoint" in out and "sct index --merge" in out and "torchrun --nproc-per-node 8" in out


def test_embed_records_kept_says_which_record_each_row_is(work) -> None:
    """Positions of the kept rows across batches, and the failures, as ``embed_records`` has always given them."""
    paths = sorted(str(p) for p in work["images"].rglob("*.png"))[:5]
    paths[1:1] = [str(work["images"] / "a_red" / "0-broken.jpg")]
    paths.append(str(work["images"] / "missing.png"))
    records = [ImageRecord(path, f"c{i % 2}", "test") for i, path in enumerate(paths)]
    model = EmbeddingNet("resnet18", DIM).eval()
    spec = preprocessing_of(
        resolve_config(
            "folder", "unused", "unused", overrides=dict(arch="resnet18", dim=DIM, image_size=SIZE, pretrained="none")
        )
    )
    transform = eval_transform(spec)  # the float pipeline, image by image: an independent reference
    result = embed_records_kept(model, records, spec, torch.device("cpu"), batch_size=2)
    assert result.kept.tolist() == [0, 2, 3, 4, 5]
    assert [failure.path for failure in result.unreadable] == [paths[1], paths[6]]
    assert result.labels.tolist() == [records[i].label for i in result.kept]
    embeddings, labels, failures = embed_records(model, records, spec, torch.device("cpu"), batch_size=3)
    assert np.abs(embeddings - result.embeddings).max() <= 1e-5 and labels.tolist() == result.labels.tolist()
    assert failures == [
        f"cannot load image {paths[1]}: {result.unreadable[0].reason}",
        f"cannot load image {paths[6]}: file not found",
    ]
    with torch.no_grad():  # independent of the loader: one forward pass over the kept images
        from catalog import load_rgb

        direct = model(torch.stack([transform(load_rgb(paths[i])) for i in result.kept]))
    assert np.abs(torch.nn.functional.normalize(direct, dim=1).numpy() - result.embeddings).max() <= 1e-5
