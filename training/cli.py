"""``sct train``, ``sct export`` and ``sct embed``. torch is imported only when a command runs."""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import catalog
from core.argtypes import non_negative_int, positive_int
from core.errors import UserError
from retrieval.cli_options import add_device, add_image_source, add_precision, add_workers
from training.config import TrainConfig

TRAIN_EPILOG = """\
Examples:
  sct train --dataset fashion-mnist --data-root data/fashion-mnist --out runs/fmnist
  sct train --dataset cub --data-root data/CUB_200_2011 --loss sct --out runs/cub-sct
  sct train --dataset sop --data-root data/Stanford_Online_Products --loss shn --lr 0.01 --out runs/sop-shn
  sct train --dataset folder --data-root ~/photos --arch resnet18 --epochs 20 --pretrained none --out runs/mine
      # from scratch: AdamW, cosine, no augmentation, and SCT's warm start (docs/hard-negatives/ZERO_SHOT.md)
  sct train --dataset folder --data-root ~/photos-2027 --pretrained runs/mine/best.pt --out runs/mine-2027
      # start from an earlier run's trunk (the pretrained-trunk recipe)
  sct train --dataset folder --data-root ~/photos --pretrained none --sct-warmup 0 --out runs/paper-sct
      # the paper's SCT from the first step, no warm start
  sct train --dataset cub --data-root data/CUB_200_2011 --config my.yaml --out runs/cub   # YAML overrides defaults
  sct train --dataset cub --data-root data/CUB_200_2011 --out runs/cub --resume           # continue after a kill
  sct train --dataset sop --data-root data/Stanford_Online_Products --compile --out runs/sop
      # GPU: bf16 + channels_last by default; --compile adds torch.compile (a minute or two to compile first)
  sct train --dataset cub --data-root data/CUB_200_2011 --loss shn --val-fraction 0.2 --out runs/tune-shn
      # tune on 20% of the training classes held out, never on the test classes
  sct train --dataset cars --data-root data/cars196 --loss htl --htl-neighbours 4 --out runs/cars-htl
      # Hierarchical Triplet Loss: 16 groups of 4 neighbouring classes × 2 images per batch of 128
  torchrun --nproc-per-node 4 -m sct train --dataset sop --data-root data/Stanford_Online_Products \\
      --gather-embeddings --sync-bn --out runs/sop-4gpu
      # 4 GPUs, one process each: --batch-size is the global batch, split into whole classes;
      # negatives mined from all 4 shares (docs/DISTRIBUTED.md)

Defaults follow the paper for each dataset (embedding size, batch, lr, λ, schedule) when
the trunk starts pretrained (imagenet or PATH). The dataset's lr is SCT's; with SGD,
--loss hn or shn defaults to a quarter of it (docs/hard-negatives/README.md). From scratch
(--pretrained none) the optimiser settings come from the start:none layer instead.
The resolved settings are written to OUT/config.yaml before training starts, with
provenance: the layer that set each (dataset:NAME, cpu, usable cpus, start:none,
optimizer:NAME, loss:NAME, lr_factor:NAME, config-file, flag); OUT/metrics.jsonl gets one line per
iteration and per evaluation, Recall@K at the dataset's Ks (those of sct eval), and a
stall_start / stall_end line when the hard-triplet fraction stays above 0.9 while S_ap
does not rise (a warning is printed too; sct report shades those stretches).
"""

EXPORT_EPILOG = """\
Examples:
  sct export --checkpoint runs/fmnist/best.pt --out runs/fmnist/model.onnx
  sct export --checkpoint runs/cub/last.pt --out models/cub.onnx --parity-images 32

The model outputs the unit embedding and the projected feature map used for
similarity heatmaps; its metadata carries the preprocessing. The export is
verified with onnx.checker and against torch with ONNX Runtime.
"""


EMBED_EPILOG = """\
Examples:
  sct embed --checkpoint runs/sop/best.pt --model runs/sop/model.onnx --dataset sop --data-root data/sop \\
      --out shards/sop                              # one GPU: one shard holding every image
  sct index --merge shards/sop --out index_data/sop

  torchrun --nproc-per-node 8 -m sct embed --checkpoint runs/sop/best.pt --model runs/sop/model.onnx \\
      --dataset sop --data-root data/sop --out shards/sop   # 8 GPUs: shard RANK of 8 on GPU LOCAL_RANK
  sct index --merge shards/sop --out index_data/sop --index-type hnsw

  sct embed --checkpoint runs/mine/best.pt --model runs/mine/model.onnx --images photos/ --out shards/photos \\
      --shard 1/4 --precision fp32                  # slice 1 of 4 on this machine, in fp32

The shards are those of `sct index --shard` (docs/SCALING.md): `sct index --merge`
builds the gallery, with the same items.csv as `sct index --model ONNX`, and the
server embeds queries with the ONNX model, which each shard carries. So before
embedding, the ONNX model's preprocessing and embedding size must match the
checkpoint's, and the first 8 readable images of the shard must embed the same
with both (cosine >= 0.999 in fp32, >= 0.99 in bf16); otherwise nothing is written.
Unreadable images are skipped and listed. The shard folder is written atomically.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_export(subparsers)
    _register_embed(subparsers)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an embedding with SCT (or a baseline loss)",
        epilog=TRAIN_EPILOG,
        description="Train a ResNet embedding on a dataset's training split and evaluate Recall@K on its test split.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=sorted(catalog.DATASETS), help="dataset layout to read")
    parser.add_argument("--data-root", required=True, metavar="PATH", help="folder holding the dataset")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder for config, metrics and checkpoints")
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings that override the dataset defaults")
    add_config_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX",
        epilog=EXPORT_EPILOG,
        description="Export a checkpoint to an ONNX model for `sct index`, `sct eval` and `sct serve`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="best.pt or last.pt of a run")
    parser.add_argument("--out", required=True, metavar="ONNX", help="where to write the model")
    parser.add_argument(
        "--parity-images",
        type=int,
        default=8,
        metavar="N",
        help="also check parity on N test images of the run's dataset (default: %(default)s)",
    )
    parser.set_defaults(func=run_export)


def _register_embed(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed a gallery's images with the torch checkpoint (GPU, bf16) into index shards",
        epilog=EMBED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed a dataset split or a folder of images with a checkpoint on the GPU and write the shard "
        "folders that `sct index --merge` turns into a gallery, checked first against the ONNX model.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="best.pt or last.pt of a run")
    parser.add_argument(
        "--model",
        required=True,
        metavar="ONNX",
        help="the model `sct export` wrote from that checkpoint; the gallery serves queries with it",
    )
    add_image_source(parser, verb="embed")
    parser.add_argument("--out", required=True, metavar="DIR", help="parent folder of the shard folders")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="embed slice I of N (I from 0); 'env': RANK/WORLD_SIZE (default: env under torchrun, "
        "else 0/1, one shard holding every image)",
    )
    add_device(parser, default="auto", help="default: cuda when present (GPU LOCAL_RANK under torchrun)")
    add_precision(parser, default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (default: %(default)s)")
    add_workers(
        parser,
        help="image-decoding processes (default: min(16, usable CPUs / processes on this "
        "machine); 0: decode in this process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_embed)


def config_flags() -> dict[str, str]:
    """The `sct train` flag of each ``TrainConfig`` setting that has one (a field made with
    ``training.config.setting``), by setting name: ``--name-with-dashes`` unless the field names its own."""
    return {
        f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        for f in dataclasses.fields(TrainConfig)
        if "help" in f.metadata
    }


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of ``config_flags()``, built from the field: its help and metavar; choices from a
    ``Literal``; ``--x/--no-x`` for a bool; nargs "+" for a list; int or float (None allowed: the flag is
    optional anyway); a count's smallest value. Every flag defaults to None: an unset flag overrides nothing."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = get_type_hints(TrainConfig)
    for name, flag in config_flags().items():
        metadata = fields[name].metadata
        options: dict[str, Any] = dict(dest=name, default=None, help=metadata["help"])
        kind = _without_none(hints[name])
        if get_origin(kind) is list:
            options["nargs"] = "+"
            (kind,) = get_args(kind)
        if get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
            if all(isinstance(choice, int) for choice in options["choices"]):
                options["type"] = int
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is int:
            options["type"] = _int_at_least(metadata["at_least"]) if "at_least" in metadata else int
        elif kind is float:
            options["type"] = float
        elif kind is not str:
            raise TypeError(f"TrainConfig.{name}: no flag for a setting of type {kind}")
        if "metavar" in metadata:
            options["metavar"] = metadata["metavar"]
        parser.add_argument(flag, **options)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that `sct train`'s parsed flags give, for ``resolve_config(overrides=...)``; None: not given."""
    return {name: getattr(args, name) for name in config_flags()}


def _without_none(kind: Any) -> Any:
    """``X`` for ``X | None``."""
    if get_origin(kind) in (Union, types.UnionType):
        (kind,) = [arg for arg in get_args(kind) if arg is not type(None)]
    return kind


def _int_at_least(low: int) -> Callable[[str], int]:
    if low in (0, 1):
        return non_negative_int if low == 0 else positive_int

    def at_least(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    at_least.__name__ = f"integer >= {low}"
    return at_least


def run_train(args: argparse.Namespace) -> int:
    import torch

    from training import distributed
    from training.config import describe_provenance, resolve_config
    from training.trainer import train

    try:
        config = resolve_config(
            args.dataset,
            args.data_root,
            args.out,
            config_file=args.config,
            overrides=overrides_from(args),
            cuda_available=torch.cuda.is_available(),
        )
    except (ValueError, FileNotFoundError) as error:  # a bad setting (flag or --config file), a missing --config
        raise UserError(str(error)) from error
    if distributed.is_main():
        print("settings (and the layer that set them; all in OUT/config.yaml):\n" + describe_provenance(config))
    run_dir = train(config, resume=args.resume, progress=not args.no_progress)
    if distributed.is_main():
        print(f"run written to {run_dir} (best.pt, last.pt, metrics.jsonl, config.yaml)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from training.export import export_onnx, parity_sample

    images = parity_sample(args.checkpoint, args.parity_images)
    report = export_onnx(args.checkpoint, args.out, parity_images=images)
    print(
        f"wrote {report.path}: onnx.checker passed; ONNX Runtime vs torch on {report.images_checked} images: "
        f"max |diff| {report.max_abs_diff_embedding:.1e} (embedding), {report.max_abs_diff_feature_map:.1e} "
        "(feature map, relative)"
    )
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from training.embed_gallery import embed_command

    return embed_command(args)
