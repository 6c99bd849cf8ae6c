"""``sct index``, ``sct eval`` and ``sct search``: build, evaluate and query gallery folders."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import catalog
from core.argtypes import non_negative_int, positive_int
from core.errors import UserError, UserFileNotFoundError, UserValueError, as_user_error
from core.shards import ShardSpec
from retrieval.cli_options import add_image_source, add_workers
from retrieval.embedder import OnnxEmbedder, Providers, default_providers, file_sha256
from retrieval.evaluation import evaluate_gallery, format_class_table, format_table, save_eval
from retrieval.filter_params import build_filter
from retrieval.gallery import (
    EVAL_FILE,
    INDEX_TYPES,
    MODEL_FILE,
    STORAGES,
    Gallery,
    GalleryItem,
    build_gallery,
    check_index_options,
    read_manifest,
)
from retrieval.gallery_update import add_items, remove_items
from retrieval.image_folder import list_image_folder
from retrieval.items import ITEMS_FILE, read_items
from retrieval.query_results import QUERY_RESULTS_FILE, per_class, save_query_results
from retrieval.rerank import METHODS, RERANK_WITH_FILTER, RerankParams, rerank_search
from retrieval.search_output import FORMATS, output_format, print_results, ranked, write_results
from retrieval.shards import list_sha256, merge_shards, write_shard
from retrieval.sources import IMAGE_FOLDER, index_sources, report_unreadable

#: INDEX_EPILOG's line on the default split, from catalog.registry: test, then each dataset whose gallery differs
_GALLERY_SPLITS_LINE = (
    "The default split is the dataset's gallery: test"
    + "".join(
        f"; {entry.index_split} for {entry.name}"
        for entry in sorted(catalog.REGISTRY.values(), key=lambda e: e.name)
        if entry.index_split != "test"
    )
    + "."
)
INDEX_EPILOG = f"""\
Examples:
  sct index --model runs/cub/model.onnx --dataset cub --data-root data/CUB_200_2011 --out index_data/cub
  sct index --model runs/inshop/model.onnx --dataset inshop --data-root data/inshop --out index_data/inshop
  sct index --model runs/sop/model.onnx --dataset sop --data-root data/sop --out index_data/sop --index-type hnsw
  sct index --model model.onnx --images photos/ --out index_data/photos   # labels = subfolder names
  sct index --model model.onnx --images photos/ --out index_data/photos --workers 4   # 4 ONNX processes

  Big galleries: embed slices anywhere (other machines, GPUs), then merge them (docs/SCALING.md)
  sct index --model model.onnx --dataset sop --data-root data/sop --shard 0/2 --out shards/sop   # machine A
  sct index --model model.onnx --dataset sop --data-root data/sop --shard 1/2 --out shards/sop   # machine B
  torchrun --nproc-per-node 4 --no-python sct index --model model.onnx --dataset sop \\
      --data-root data/sop --shard env --out shards/sop        # slice RANK of WORLD_SIZE
  sct index --merge shards/sop/shard-* --out index_data/sop
  sct index --merge shards/hotels --out index_data/hotels --index-type ivf-flat --storage ondisk

  Change a gallery in place, embedding only what is new (docs/GALLERY_UPDATES.md)
  sct index --add --images photos/ --out index_data/photos      # the images not yet in the gallery
  sct index --add --files new.txt --out index_data/photos       # one PATH[<TAB>LABEL] per line
  sct index --remove 17 42 --out index_data/photos              # by item id (see sct search or the web app)
  sct index --remove-file gone.txt --out index_data/photos      # ids, one per line

  {_GALLERY_SPLITS_LINE}
  Unreadable images are skipped and listed. The folder is replaced atomically.
  --shard I/N writes slice I (from 0) of N to OUT/shard-IIIII-of-NNNNN; --merge takes all N
  (or their parent folder) and writes the gallery a single `sct index` would have written.
  --storage ondisk keeps an IVF index's lists in index.ivfdata, memory-mapped, not loaded.
  --add and --remove keep every other item's id and vector; the manifest's history lists each change.
"""
EVAL_EPILOG = """\
Examples:
  sct eval --index index_data/cub                                          # leave-one-out, K = 1 2 4 8
  sct eval --index index_data/inshop --queries-split query --data-root data/inshop --k 1 10 20 30 40
  sct eval --index index_data/photos --queries-images queries/ --json results/photos.json
  sct eval --index index_data/cars --per-class                             # then Recall@1, MAP@R per class
  sct eval --index index_data/sop --save-top 50                            # keep each query's top 50
  sct eval --index index_data/cub --rerank k-reciprocal --rerank-k1 20     # re-ranked (docs/RERANKING.md)

  Without queries every gallery image is a query against the others (itself
  excluded by id). Queries whose label has no other gallery image are skipped
  and counted. The result is also written to eval.json in the gallery folder,
  and each query's own results (first correct rank, AP@R, top K gallery ids
  and scores) to eval_queries.npz next to it (docs/DESIGN.md).
  --rerank re-orders each query's results before they are scored: k-reciprocal
  (its top --rerank-candidates by k-reciprocal Jaccard distance), qe (alpha
  query expansion) or dba (database-side augmentation); eval.json records it.
  It is off by default: on the galleries measured it lowers Recall@1
  while raising MAP@R (docs/RERANKING.md).
"""
SEARCH_EPILOG = """\
Examples:
  sct search --index index_data/cub bird.jpg
  sct search --index index_data/sop chair.png lamp.png --k 5
  sct search --index index_data/sop queries/ --output results.csv            # a row per query and rank
  sct search --index index_data/sop queries/ --output results.jsonl --k 20   # an object per query
  sct search --index index_data/cub bird.jpg --label 017.Cardinal --label 018.Spotted_Catbird
  sct search --index index_data/photos sofa.jpg --exclude-label chairs --id-range 0-5000
  sct search --index index_data/photos q.jpg --ids 3,17,42

  A folder is searched with all its images (at any depth when it has
  subfolders). Queries are embedded --batch-size at a time. Unreadable query
  images are listed at the end and the exit status is then 2. The results
  file (path, as in the gallery's items.csv) is replaced atomically.
  --label keeps only items of those labels, --exclude-label leaves those out,
  --ids keeps only those item ids, --id-range START-STOP only ids from START
  up to but not including STOP; together, an item must pass them all.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index``, ``eval`` and ``search`` subcommands."""
    index = subparsers.add_parser(
        "index",
        help="embed images with an ONNX model and build a gallery folder",
        description="Embed a dataset split or a folder of images and write a gallery folder "
        "(manifest.json, index.faiss, items.csv, model.onnx).",
        epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument("--model", metavar="ONNX", help="model exported by `sct export` (not with --merge)")
    source = add_image_source(index, verb="index")
    source.add_argument(
        "--files", metavar="LIST", help="text file of image paths, one per line, optionally PATH<TAB>LABEL"
    )
    source.add_argument(
        "--remove", nargs="+", type=non_negative_int, metavar="ID", help="remove these items from the gallery --out"
    )
    source.add_argument("--remove-file", metavar="FILE", help="remove the items whose ids FILE lists, one per line")
    index.add_argument(
        "--add",
        action="store_true",
        help="add the images (--images, --dataset or --files) that the gallery --out lacks, with its own model",
    )
    source.add_argument(
        "--merge",
        nargs="+",
        metavar="SHARD_DIR",
        help="build the gallery from the shards written by --shard (shard folders or their parent)",
    )
    index.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="gallery folder to write, e.g. index_data/NAME (with --shard: the shards' parent folder)",
    )
    index.add_argument(
        "--shard",
        metavar="I/N",
        help="embed only slice I of N (I from 0) into a shard folder; 'env': I/N = RANK/WORLD_SIZE",
    )
    add_workers(
        index,
        help="embedding processes, each with its own ONNX Runtime session (default: 1; 0 or 1: "
        "embed in this process)",
    )
    index.add_argument("--index-type", choices=INDEX_TYPES, help="FAISS index (default: flat, exact search)")
    index.add_argument(
        "--storage",
        choices=STORAGES,
        help="memory (default), or ondisk: an ivf index's lists memory-mapped from index.ivfdata",
    )
    index.add_argument("--nlist", type=positive_int, help="IVF lists (ivf types; default about 4·√N)")
    index.add_argument("--nprobe", type=positive_int, help="IVF lists searched per query (default nlist / 8)")
    index.add_argument("--batch-size", type=positive_int, help="images per model call (default: 64)")
    index.set_defaults(func=index_command)

    evaluation = subparsers.add_parser(
        "eval",
        help="Recall@K, MAP@R and P@1 of a gallery",
        description="Evaluate a gallery folder, leave-one-out or with separate query images, print a "
        "table and write eval.json and eval_queries.npz (each query's results) into the folder.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluation.add_argument("--index", required=True, metavar="DIR", help="gallery folder")
    queries = evaluation.add_mutually_exclusive_group()
    queries.add_argument(
        "--queries-split", metavar="SPLIT", help="query split of the gallery's dataset (needs --data-root)"
    )
    queries.add_argument(
        "--queries-images", metavar="DIR", help="folder of query images; subfolder names are the labels"
    )
    evaluation.add_argument("--data-root", metavar="PATH", help="dataset folder (with --queries-split)")
    evaluation.add_argument(
        "--k", type=positive_int, nargs="+", help="K of Recall@K (default: the dataset's usual ones, else 1 2 4 8)"
    )
    evaluation.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    evaluation.add_argument("--batch-size", type=positive_int, default=64, help="query images per model call")
    evaluation.add_argument(
        "--save-top",
        type=positive_int,
        default=10,
        metavar="K",
        help=f"gallery ids and scores kept per query in {QUERY_RESULTS_FILE} (default: %(default)s)",
    )
    evaluation.add_argument(
        "--per-class",
        action="store_true",
        help="also print Recall@1 and MAP@R of each class, worst first",
    )
    _add_rerank_options(evaluation)
    evaluation.set_defaults(func=eval_command)

    search = subparsers.add_parser(
        "search",
        help="print the nearest gallery images of query images",
        description="Embed each query image with the gallery's model and print its top K gallery images, or "
        "write them to a CSV or JSON Lines file.",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("--index", required=True, metavar="DIR", help="gallery folder")
    search.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders of them")
    search.add_argument("--k", type=positive_int, default=10, help="results per query (default: %(default)s)")
    search.add_argument("--output", metavar="FILE", help="write the results to FILE (.csv or .jsonl) instead")
    search.add_argument("--format", choices=FORMATS, help="format of --output (default: from its extension)")
    search.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="query images per model call (default: %(default)s)",
    )
    search.add_argument("--label", action="append", default=[], help="only items of this label; repeat for several")
    search.add_argument("--exclude-label", action="append", default=[], metavar="LABEL", help="no items of this label")
    search.add_argument(
        "--ids", action="append", default=[], metavar="ID,ID,...", help="only these item ids; repeatable"
    )
    search.add_argument("--id-range", metavar="START-STOP", help="only item ids from START up to but not STOP")
    search.add_argument(
        "--rerank",
        choices=METHODS,
        default="none",
        help="re-rank the results (docs/RERANKING.md; off by default: it lowered Recall@1 where measured)",
    )
    search.set_defaults(func=search_command)


_EMBEDDING_OPTIONS = ("model", "data_root", "split", "shard", "workers", "batch_size")
_GALLERY_OPTIONS = ("index_type", "storage", "nlist", "nprobe")


def index_command(args: argparse.Namespace) -> int:
    """Embed the images and write the gallery folder (or one shard of it), or merge shards into a gallery."""
    # Reading and writing files the user named: a missing or unreadable file, a full disk. The library's own
    # refusals (bad option values, mismatched shards, unreadable datasets) are UserErrors already.
    with as_user_error(OSError):
        return _index(args)


def _index(args: argparse.Namespace) -> int:
    if args.remove or args.remove_file:
        _refuse_options(args, _EMBEDDING_OPTIONS + _GALLERY_OPTIONS, "--remove changes the gallery --out only")
        if args.add:
            raise UserValueError("--add and --remove are separate changes: run one, then the other")
        ids = args.remove or _read_ids(args.remove_file)
        removed = remove_items(args.out, ids)
        print(f"removed {removed:,} item(s)")
        return _print_summary(args.out)
    if args.add:
        return _add(args)
    gallery_options = {
        "index_type": args.index_type or "flat",
        "storage": args.storage or "memory",
        "nlist": args.nlist,
        "nprobe": args.nprobe,
    }
    check_index_options(**gallery_options)
    if args.merge:
        _refuse_options(args, _EMBEDDING_OPTIONS, "--merge takes the model and images from the shards")
        # The stages of an on-disk IVF build (minutes for millions of vectors) are logged at INFO, which
        # sct.cli.main shows on stderr.
        return _print_summary(merge_shards(args.merge, args.out, **gallery_options))
    if not args.model:
        raise UserValueError("--model is required (except with --merge)")
    if args.shard:
        _refuse_options(args, _GALLERY_OPTIONS, "a shard holds vectors only; choose the index when merging")
    shard = ShardSpec.parse(args.shard) if args.shard else None
    sources, dataset, split, root = index_sources(
        dataset=args.dataset, data_root=args.data_root, split=args.split, images=args.images, files=args.files
    )
    start, stop = shard.bounds(len(sources)) if shard else (0, len(sources))
    embedder = OnnxEmbedder(args.model, providers=_rank_providers() if args.shard == "env" else None)
    what = f"{len(sources):,} images of {dataset} {split}".rstrip()
    print(f"indexing {f'images [{start:,}, {stop:,}) (shard {shard}) of ' if shard else ''}{what}", file=sys.stderr)
    result = embedder.embed_paths(
        [path for path, _, _ in sources[start:stop]], batch_size=args.batch_size or 64, workers=args.workers or 1
    )
    report_unreadable(result.failures)
    items = [GalleryItem(row, *sources[start + source]) for row, source in enumerate(result.kept_indices)]
    if shard:
        folder = write_shard(
            args.out,
            shard,
            result.embeddings,
            items,
            args.model,
            total_images=len(sources),
            image_list_sha256=list_sha256(sources),
            unreadable=len(result.failures),
            dataset=dataset,
            split=split,
            image_roots=[root],
        )
        print(
            f"wrote shard {shard} to {folder}: {len(items):,} items; once all {shard.count} are written: "
            f"sct index --merge {args.out} --out GALLERY"
        )
        return 0
    if not items:
        raise UserError("none of the images could be read; nothing to index")
    out = build_gallery(
        args.out,
        result.embeddings,
        items,
        args.model,
        dataset=dataset,
        split=split,
        image_roots=[root],
        **gallery_options,
    )
    return _print_summary(out)


def _add(args: argparse.Namespace) -> int:
    """``sct index --add``: embed the listed images that the gallery lacks with its model, and append them."""
    _refuse_options(args, ("shard",) + _GALLERY_OPTIONS, "--add keeps the gallery's index")
    if args.merge:
        raise UserValueError("--add takes --images, --dataset or --files, not --merge")
    gallery_model = Path(args.out) / MODEL_FILE
    manifest = read_manifest(args.out)
    if args.model and file_sha256(args.model) != manifest["model_sha256"]:
        raise UserValueError(
            f"{args.model} is not the model of gallery {args.out}; --add embeds with the gallery's own "
            f"{MODEL_FILE} (drop --model), and another model needs a new gallery"
        )
    sources, dataset, split, root = index_sources(
        dataset=args.dataset, data_root=args.data_root, split=args.split, images=args.images, files=args.files
    )
    held = {os.path.realpath(item.path) for item in read_items(Path(args.out) / ITEMS_FILE)}
    new = [source for source in sources if os.path.realpath(source[0]) not in held]
    print(f"{len(sources) - len(new):,} of {len(sources):,} images are in the gallery already", file=sys.stderr)
    if not new:
        print(f"nothing to add to {args.out}")
        return 0
    embedder = OnnxEmbedder(gallery_model)
    result = embedder.embed_paths(
        [path for path, _, _ in new], batch_size=args.batch_size or 64, workers=args.workers or 1
    )
    report_unreadable(result.failures)
    if not len(result.kept_indices):
        raise UserError("none of the new images could be read; nothing was added")
    kept = [new[i] for i in result.kept_indices]
    note = f"{dataset} {split} of {root}" if args.dataset else os.path.realpath(args.files or args.images)
    ids = add_items(args.out, result.embeddings, kept, image_root=root, note=str(note))
    print(f"added {len(ids):,} item(s), ids {ids[0]}..{ids[-1]}")
    return _print_summary(args.out)


def _read_ids(path: str) -> list[int]:
    """The item ids a --remove-file lists, one per line (blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserFileNotFoundError(f"id list not found: {path}") from None
    entries = [line.split("#")[0].strip() for line in lines]
    entries = [entry for entry in entries if entry]
    bad = next((entry for entry in entries if not (entry.isascii() and entry.isdigit())), None)
    if bad is not None or not entries:
        raise UserValueError(f"{path} must list item ids, one whole number per line; got {bad!r}")
    return [int(entry) for entry in entries]


def _refuse_options(args: argparse.Namespace, names: Sequence[str], reason: str) -> None:
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]
    if given:
        raise UserValueError(f"{reason}: drop {', '.join(given)}")


def _rank_providers() -> Providers | None:
    """Under torchrun each process of a machine embeds on its own GPU: GPU LOCAL_RANK."""
    return default_providers(int(os.environ["LOCAL_RANK"])) if "LOCAL_RANK" in os.environ else None


def _print_summary(out: os.PathLike[str]) -> int:
    manifest = read_manifest(out)
    summary = f"wrote {out}: {manifest['count']:,} items, {manifest['embedding_dim']}-d"
    if len(manifest.get("history", [])) > 1:
        summary += f", {len(manifest['history']) - 1} change(s) since the build (manifest history)"
    summary += f", FAISS {manifest['faiss_factory']}"
    if manifest.get("storage") == "ondisk":
        summary += f" with its lists on disk ({manifest['ivfdata_file']})"
    if "recall_at_10_vs_exact" in manifest:
        summary += f", Recall@10 vs exact search {manifest['recall_at_10_vs_exact']:.4f}"
    print(summary)
    return 0


#: (flag, RerankParams field, type, help) of the re-ranking parameters
_RERANK_OPTIONS = (
    ("--rerank-k1", "k1", positive_int, "k-reciprocal: k1, the neighbourhood size"),
    ("--rerank-k2", "k2", positive_int, "k-reciprocal: k2, the local query expansion"),
    ("--rerank-lambda", "lam", float, "k-reciprocal: weight of the original distance, 0..1"),
    ("--rerank-candidates", "candidates", positive_int, "k-reciprocal: results re-ranked per query"),
    ("--qe-alpha", "alpha", float, "qe and dba: exponent of the similarity weights"),
    ("--qe-n", "n", positive_int, "qe and dba: neighbours added to each vector"),
)


def _add_rerank_options(parser: argparse.ArgumentParser) -> None:
    """--rerank and its parameters, with RerankParams' defaults."""
    defaults = RerankParams()
    group = parser.add_argument_group("re-ranking")
    group.add_argument("--rerank", choices=METHODS, default="none", help="re-ranking method (default: none)")
    for flag, field, kind, text in _RERANK_OPTIONS:
        group.add_argument(
            flag,
            dest=f"rerank_{field}",
            metavar=field.upper(),
            type=kind,
            default=getattr(defaults, field),
            help=f"{text} (default: %(default)s)",
        )


def _rerank_params(args: argparse.Namespace) -> RerankParams:
    return RerankParams(args.rerank, **{field: getattr(args, f"rerank_{field}") for _, field, _, _ in _RERANK_OPTIONS})


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate the gallery, print the table, write eval.json (and --json)."""
    with as_user_error(OSError):
        return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    rerank = _rerank_params(args)
    gallery = Gallery.load(args.index)
    dataset = gallery.manifest.get("dataset", "")
    queries: Sequence[tuple[str, str, str | None]] | str | None = args.queries_images
    if args.queries_split:
        if not args.data_root:
            raise UserValueError("--queries-split needs --data-root")
        if dataset == IMAGE_FOLDER:
            raise UserValueError(f"gallery {gallery.name} was built from an image folder; use --queries-images")
        records = catalog.select_split(catalog.read_dataset(dataset, args.data_root), args.queries_split)
        queries = [(r.path, r.label, r.chain) for r in records]
    elif args.data_root:
        raise UserValueError("--data-root goes with --queries-split")
    ks = args.k or catalog.recall_ks(dataset)
    results, query_results = evaluate_gallery(
        gallery, ks, queries, batch_size=args.batch_size, per_query_top=args.save_top, rerank=rerank
    )
    report_unreadable([(failure["path"], failure["reason"]) for failure in results["unreadable_queries"]])
    print(format_table(results))
    if args.per_class:
        print()
        print(format_class_table(per_class(query_results)))
    for path in [gallery.directory / EVAL_FILE, *([args.json] if args.json else [])]:
        print(f"wrote {save_eval(results, path)}", file=sys.stderr)
    print(f"wrote {save_query_results(query_results, gallery.directory / QUERY_RESULTS_FILE)}", file=sys.stderr)
    return 0


def search_command(args: argparse.Namespace) -> int:
    """Print the top K of each query image; 2 if any query image could not be read."""
    with as_user_error(OSError):
        return _search(args)


def _search(args: argparse.Namespace) -> int:
    search_filter = build_filter(
        labels=args.label,
        exclude_labels=args.exclude_label,
        ids=args.ids,
        id_range=args.id_range,
        names={"ids": "--ids", "id_range": "--id-range"},
    )
    if args.format and not args.output:
        raise UserValueError("--format goes with --output")
    if args.rerank != "none" and search_filter is not None:
        raise UserValueError(f"{RERANK_WITH_FILTER}: drop --rerank or the filter flags")
    fmt = output_format(args.output, args.format) if args.output else None
    paths = _query_paths(args.images)
    gallery = Gallery.load(args.index)
    embedded = gallery.embedder.embed_paths(paths, batch_size=args.batch_size, progress=len(paths) > args.batch_size)
    queries = [paths[i] for i in embedded.kept_indices]
    results = []
    if queries:
        if args.rerank == "none":
            scores, ids = gallery.search(embedded.embeddings, args.k, search_filter)
        else:
            scores, ids = rerank_search(gallery, embedded.embeddings, args.k, args.rerank)
        results = [ranked(gallery, *row) for row in zip(scores, ids)]
    if fmt is None:
        print_results(queries, results)
    elif queries:  # all unreadable: the file, if any, is kept as it was
        write_results(args.output, fmt, queries, results)
        print(f"wrote {args.output}: {len(queries):,} queries", file=sys.stderr)
    if embedded.failures:
        lines = [f"  {path}: {reason}" for path, reason in embedded.failures]
        kept = "" if queries or fmt is None else f"; {args.output} not written"
        print(f"error: cannot load {len(embedded.failures):,} of {len(paths):,} query images{kept}:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr)
        return 2
    return 0


def _query_paths(arguments: Sequence[str]) -> list[str]:
    """The query image files named, each folder replaced by its images (sorted)."""
    paths = []
    for argument in arguments:
        if os.path.isdir(argument):
            paths.extend(path for path, _ in list_image_folder(argument))
        else:
            paths.append(argument)
    return paths
