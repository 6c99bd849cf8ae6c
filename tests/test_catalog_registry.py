"""catalog.registry: one spec per dataset, from which `sct index`, `sct eval`, `sct train` and the evaluation during
training all take their splits, Ks and presets; each check here is also shown to catch a disagreement."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import catalog
from catalog.records import SPLITS, ImageRecord
from catalog.registry import DatasetSpec

NAMES = sorted(catalog.REGISTRY)

#: The benchmarks' own protocols and Recall@K tables (docs/DATASETS.md, "The five benchmarks of the paper"), written out
#: here rather than read from the registry: (query split, gallery split or None for leave-one-out, Ks)
PUBLISHED = {
    "cub": ("test", None, (1, 2, 4, 8)),
    "cars": ("test", None, (1, 2, 4, 8)),
    "sop": ("test", None, (1, 2, 4, 8)),
    "inshop": ("query", "gallery", (1, 10, 20, 30, 40)),
    "hotels50k": ("query", "train", (1, 10, 100)),
    "folder": ("test", None, (1, 2, 4, 8)),
    "fashion-mnist": ("test", None, (1, 2, 4, 8)),
}


class _Evaluated(Exception):
    """Stops `sct eval` at the metric call, carrying what it was given."""


def _every_split(root: Path) -> list[ImageRecord]:
    """Records with every split name, two classes of two images each, every path distinct."""
    return [
        ImageRecord(os.path.join(root, split, label, f"{i}.png"), label, split, chain="c")
        for split in SPLITS
        for label in ("a", "b")
        for i in range(2)
    ]


def _sct_eval(argv: list[str], dataset: str, monkeypatch) -> tuple[list[int], list | None]:
    """The Ks and the queries (None: leave-one-out) `sct eval` passes on for a gallery built from ``dataset``."""
    import retrieval.cli
    from sct.cli import build_parser

    class Loaded:
        name, manifest = "unused", {"dataset": dataset}

    def evaluate_gallery(gallery, ks, queries=None, **kwargs):
        raise _Evaluated(list(ks), queries)

    monkeypatch.setattr(retrieval.cli.Gallery, "load", staticmethod(lambda directory: Loaded()))
    monkeypatch.setattr(retrieval.cli, "evaluate_gallery", evaluate_gallery)
    args = build_parser().parse_args(["eval", "--index", "unused", *argv])
    with pytest.raises(_Evaluated) as evaluated:
        args.func(args)
    return evaluated.value.args


def _cli_protocol(
    name: str,
    records: list[ImageRecord],
    root: Path,
    monkeypatch,
    *,
    index_flags: tuple[str, ...] = (),
    eval_flags: tuple[str, ...] | None = None,
) -> tuple:
    """What `sct index --dataset NAME` embeds and `sct eval` queries: ("leave-one-out", gallery paths) or
    ("queries", query paths, gallery paths). ``eval_flags`` default: the commands docs/DATASETS.md gives, with
    ``--queries-split`` where the benchmark has a gallery split of its own."""
    from retrieval.sources import index_sources
    from sct.cli import build_parser

    monkeypatch.setattr(catalog, "read_dataset", lambda dataset, data_root: records)
    args = build_parser().parse_args(
        [
            "index",
            "--model",
            "m.onnx",
            "--dataset",
            name,
            "--data-root",
            str(root),
            "--out",
            str(root / "out"),
            *index_flags,
        ]
    )
    sources, _, _, _ = index_sources(
        dataset=args.dataset, data_root=args.data_root, split=args.split, images=args.images
    )
    gallery = [path for path, _, _ in sources]
    if eval_flags is None:
        entry = catalog.spec(name)
        eval_flags = ("--queries-split", entry.query_split, "--data-root", str(root)) if entry.gallery_split else ()
    _, queries = _sct_eval(list(eval_flags), name, monkeypatch)
    if queries is None:
        return ("leave-one-out", gallery)
    return ("queries", [path for path, _, _ in queries], gallery)


def _training_protocol(name: str, records: list[ImageRecord]) -> tuple:
    """The same for the evaluation during `sct train --dataset NAME`."""
    from training.trainer import evaluation_splits

    queries, gallery = evaluation_splits(records, name)
    if gallery is None:
        return ("leave-one-out", [r.path for r in queries])
    return ("queries", [r.path for r in queries], [r.path for r in gallery])


@pytest.mark.parametrize("name", NAMES)
def test_training_evaluates_the_queries_and_gallery_of_sct_index_and_sct_eval(name, tmp_path, monkeypatch, capsys):
    root = Path(os.path.realpath(tmp_path))
    records = _every_split(root)
    assert _training_protocol(name, records) == _cli_protocol(name, records, root, monkeypatch)


def test_the_comparison_catches_a_gallery_split_that_disagrees(tmp_path, monkeypatch, capsys):
    """Had `sct index` embedded In-shop's or Hotels-50K's gallery from another split, or `sct eval` run
    leave-one-out where training used queries, the comparison above would fail."""
    root = Path(os.path.realpath(tmp_path))
    records = _every_split(root)
    for name, index_flags, eval_flags in (
        ("hotels50k", ("--split", "gallery"), None),
        ("inshop", ("--split", "test"), None),
        ("inshop", (), ()),
        ("cub", ("--split", "train"), ()),
    ):
        assert _training_protocol(name, records) != _cli_protocol(
            name, records, root, monkeypatch, index_flags=index_flags, eval_flags=eval_flags
        )


@pytest.mark.parametrize("name", NAMES)
def test_training_logs_recall_at_the_ks_of_sct_eval(name, monkeypatch):
    from training.config import resolve_config

    ks, _ = _sct_eval([], name, monkeypatch)
    for cuda_available in (False, True):
        assert resolve_config(name, "d", "o", cuda_available=cuda_available).eval_ks == ks


def test_the_ks_comparison_tells_other_ks_apart(monkeypatch):
    from training.config import resolve_config

    ks, _ = _sct_eval(["--k", "1", "5"], "cub", monkeypatch)
    assert resolve_config("cub", "d", "o").eval_ks != ks


def _published(entry: DatasetSpec) -> tuple:
    return entry.query_split, entry.gallery_split, entry.recall_ks


def test_the_registry_holds_the_published_protocols_and_ks():
    import retrieval.evaluation

    assert set(catalog.REGISTRY) == set(PUBLISHED)
    for name, published in PUBLISHED.items():
        assert _published(catalog.spec(name)) == published, name
    hotels = catalog.spec("hotels50k")
    assert [(s.field, s.ks) for s in hotels.extra_label_sets] == [("chain", (1, 3, 5))]
    assert retrieval.evaluation.CHAIN_KS == hotels.extra_label_sets[0].ks
    assert not any(catalog.spec(name).extra_label_sets for name in PUBLISHED if name != "hotels50k")
    # a spec whose gallery split or Ks disagree with the benchmark's is told apart
    assert _published(dataclasses.replace(hotels, gallery_split="gallery")) != PUBLISHED["hotels50k"]
    assert _published(dataclasses.replace(hotels, recall_ks=(1, 2, 4, 8))) != PUBLISHED["hotels50k"]


def test_an_unknown_name_is_refused_with_the_valid_names(tmp_path):
    from retrieval.sources import index_sources
    from sct.cli import build_parser

    listed = r"valid names: cars, cub, fashion-mnist, folder, hotels50k, inshop, sop$"
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; " + listed):
        catalog.spec("imagenet")
    with pytest.raises(ValueError, match=listed):
        catalog.read_dataset("imagenet", tmp_path)
    args = build_parser().parse_args(
        [
            "index",
            "--model",
            "m.onnx",
            "--dataset",
            "imagenet",
            "--data-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    with pytest.raises(ValueError, match=listed):
        index_sources(dataset=args.dataset, data_root=args.data_root, split=args.split, images=args.images)
    assert sorted(catalog.REGISTRY) == listed.removeprefix("valid names: ").removesuffix("$").split(", ")


def test_names_outside_the_registry_fall_back_to_the_folder_where_a_default_is_wanted():
    """A gallery of an image folder is evaluated at the folder's Ks, and resolve_config gives any other name the
    folder's preset; read_dataset and the training-time evaluation refuse them instead."""
    from training.config import resolve_config

    folder = catalog.spec("folder")
    for name in ("image-folder", "", "imagenet"):
        assert catalog.spec_or_folder(name) is folder
        assert catalog.recall_ks(name) == folder.recall_ks == catalog.DEFAULT_KS
    assert resolve_config("imagenet", "d", "o").dim == folder.training_preset["dim"]


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_has_a_reader_and_a_preset_that_resolves(name):
    from training.config import DATASET_DEFAULTS, resolve_config

    entry = catalog.spec(name)
    assert entry.name == name and callable(entry.reader) and catalog.DATASETS[name] is entry.reader
    assert entry.training_preset and DATASET_DEFAULTS[name] is entry.training_preset
    plain = {k: v for k, v in entry.training_preset.items() if k not in ("cpu", "sgd", "adamw", "losses")}
    for cuda_available in (False, True):
        config = resolve_config(name, "d", "o", cuda_available=cuda_available)
        from_preset = {k for k, layer in config.provenance.items() if layer == f"dataset:{name}"}
        on_cpu = set() if cuda_available else set(entry.training_preset.get("cpu", {}))
        assert from_preset == (set(plain) - on_cpu) | {"eval_ks"}


@pytest.mark.parametrize(
    "broken",
    [
        dict(reader=None),
        dict(training_preset={}),
        dict(recall_ks=()),
        dict(recall_ks=(0, 1)),
        dict(gallery_split="test"),
        dict(extra_label_sets=(catalog.LabelSet("brand", (1,)),)),
    ],
)
def test_a_spec_without_a_reader_or_preset_or_with_bad_ks_or_splits_is_refused(broken):
    fields = dict(name="x", reader=catalog.DATASETS["folder"], training_preset=dict(dim=64))
    DatasetSpec(**fields)  # the fields above alone make a valid spec
    with pytest.raises(ValueError, match="dataset 'x'"):
        DatasetSpec(**{**fields, **broken})


def test_every_split_named_is_one_readers_produce_and_training_reads_train():
    """Readers may only use catalog.records.SPLITS; the trainer and catalog.validation take the "train" split."""
    for entry in catalog.REGISTRY.values():
        named = {entry.train_split, entry.index_split} | {s for p in entry.protocols for s in p if s}
        assert named <= set(SPLITS), entry.name
        assert entry.train_split == "train", entry.name


def test_sct_index_help_names_each_gallery_that_is_not_test():
    from sct.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.choices and "index" in a.choices)
    shown = subcommands.choices["index"].format_help()
    assert "The default split is the dataset's gallery: test; train for hotels50k; gallery for inshop." in shown
