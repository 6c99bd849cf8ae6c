"""``sct train``, ``sct export`` and ``sct embed``. torch is imported only when a command runs."""
from __future__ import annotations

import argparse

import catalog
from core.argtypes import non_negative_int, positive_int
from core.errors import UserError

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
  torchrun --nproc-per-node 4 -m sct train --dataset sop --data-root data/Stanford_Online_Products \
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
        "train", help="train an embedding with SCT (or a baseline loss)", epilog=TRAIN_EPILOG,
        description="Train a ResNet embedding on a dataset's training split and evaluate Recall@K on its test split.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(catalog.DATASETS), help="dataset layout to read")
    parser.add_argument("--data-root", required=True, metavar="PATH", help="folder holding the dataset")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder for config, metrics and checkpoints")
    parser.add_argument("--loss", choices=["sct", "hn", "shn", "ep", "batch-all", "htl"],
                        help="sct (default); baselines: hn, shn, ep (easy positive), batch-all (triplet margin), "
                             "htl (hierarchical triplet loss, Ge et al. 2018)")
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings that override the dataset defaults")
    parser.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"], help="backbone")
    parser.add_argument("--dim", type=int, help="embedding size")
    parser.add_argument("--image-size", type=int, help="training and evaluation crop size in pixels")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="images per batch (P classes × K images)")
    parser.add_argument("--images-per-class", type=int, metavar="K", help="K in the P×K batch (paper: 2)")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], help="the paper's SGD (default) or AdamW")
    parser.add_argument("--lam", type=float, help="SCT's λ on hard triplets")
    parser.add_argument("--temperature", type=float, help="NCA temperature τ (default 0.1)")
    parser.add_argument("--margin", type=float, help="margin of --loss batch-all (default 0.2)")
    parser.add_argument("--hard-threshold", type=float, metavar="T",
                        help="--loss sct: also treat S_an > T as hard (the official code uses 0.8)")
    parser.add_argument("--hard-floor", type=float, metavar="F",
                        help="--loss sct: a triplet is hard only if also S_an > F (the official code's 2020 "
                             "version: 0.5)")
    parser.add_argument("--sct-warmup", type=float, metavar="SHARE",
                        help="--loss sct: over this first share of the run (0 to 1), each anchor's loss moves from a loss "
                             "that pulls positives in (--sct-warm-loss) to SCT's; 0: the paper's SCT throughout")
    parser.add_argument("--sct-warm-loss", choices=["ep", "shn"],
                        help="--loss sct: the loss the warm start blends in (default ep: Easy-Positive NCA)")
    parser.add_argument("--htl-levels", type=int, metavar="L", help="--loss htl: levels of the class tree (default 16)")
    parser.add_argument("--htl-beta", type=float, metavar="B",
                        help="--loss htl: β in the margin α = β + d_H(ya,yn) − s_ya (default 0.1)")
    parser.add_argument("--htl-neighbours", type=int, metavar="M",
                        help="--loss htl: classes per group, a random class and its M − 1 nearest (default 4); "
                             "the batch size must be a multiple of M × images per class")
    parser.add_argument("--htl-rebuild-every", type=int, metavar="EPOCHS",
                        help="--loss htl: rebuild the class tree every N epochs (default 1; 0: once, at the start)")
    parser.add_argument("--htl-tree-images-per-class", type=int, metavar="N",
                        help="--loss htl: embed at most N images per class to build the tree (default: all)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the training step's model (default off: compiling costs a minute or "
                             "two first; see benchmarks/results/gpu_speed.md for what it gains)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--pretrained", metavar="imagenet|none|PATH",
                        help="how the network starts, which also picks the recipe (docs/hard-negatives/ZERO_SHOT.md): "
                             "imagenet (torchvision's cached weights), none (from scratch: its own defaults), or "
                             "PATH: a torchvision state dict or an `sct train` checkpoint, whose trunk is loaded")
    parser.add_argument("--eval-every", type=int, metavar="EPOCHS", help="evaluate every N epochs (0: at the end)")
    parser.add_argument("--eval-ks", type=positive_int, nargs="+", metavar="K",
                        help="K of the logged Recall@K, the first choosing best.pt (default: the dataset's, as in "
                             "sct eval: 1 10 20 30 40 for inshop, 1 10 100 for hotels50k, else 1 2 4 8)")
    parser.add_argument("--embedding-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="a BatchNorm on the embedding before L2 normalisation (default: on with --pretrained "
                             "none, where it keeps a random network's embeddings from starting in one narrow cone; "
                             "off with pretrained weights, as in the paper)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crop from 1.1× and horizontal flip (the paper's; default on, off for the demo)")
    parser.add_argument("--workers", type=int, help="data-loading processes")
    parser.add_argument("--max-iters-per-epoch", type=int, metavar="N", help="cap iterations per epoch (quick runs)")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help="hold out this share of the training split and evaluate on it instead of the test "
                             "split (for tuning; default 0: evaluate on test)")
    parser.add_argument("--val-by", choices=["auto", "classes", "images"],
                        help="hold out whole classes or images of every class (auto: images when train and test "
                             "share their classes, as in Fashion-MNIST)")
    parser.add_argument("--gather-embeddings", action="store_true", default=None,
                        help="under torchrun: mine positives and negatives from the global batch (all processes' "
                             "embeddings), with gradients equal to one process training on that batch; "
                             "default: each process mines within its own share")
    parser.add_argument("--sync-bn", dest="sync_batchnorm", action="store_true", default=None,
                        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
    parser.add_argument("--dist-backend", choices=["auto", "nccl", "gloo"],
                        help="under torchrun: process-group backend (auto: nccl on CUDA, gloo on CPU)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX", epilog=EXPORT_EPILOG,
        description="Export a checkpoint to an ONNX model for `sct index`, `sct eval` and `sct serve`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="best.pt or last.pt of a run")
    parser.add_argument("--out", required=True, metavar="ONNX", help="where to write the model")
    parser.add_argument("--parity-images", type=int, default=8, metavar="N",
                        help="also check parity on N test images of the run's dataset (default: %(default)s)")
    parser.set_defaults(func=run_export)


def _register_embed(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed a gallery's images with the torch checkpoint (GPU, bf16) into index shards",
        epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed a dataset split or a folder of images with a checkpoint on the GPU and write the shard "
                    "folders that `sct index --merge` turns into a gallery, checked first against the ONNX model.")
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="best.pt or last.pt of a run")
    parser.add_argument("--model", required=True, metavar="ONNX",
                        help="the model `sct export` wrote from that checkpoint; the gallery serves queries with it")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="NAME", help=f"dataset name ({', '.join(sorted(catalog.DATASETS))})")
    source.add_argument("--images", metavar="DIR", help="folder of images; subfolder names are the labels")
    parser.add_argument("--data-root", metavar="PATH", help="dataset folder (with --dataset)")
    parser.add_argument("--split", help="split to embed (with --dataset; default: the dataset's gallery split)")
    parser.add_argument("--out", required=True, metavar="DIR", help="parent folder of the shard folders")
    parser.add_argument("--shard", metavar="I/N",
                        help="embed slice I of N (I from 0); 'env': RANK/WORLD_SIZE (default: env under torchrun, "
                             "else 0/1, one shard holding every image)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: cuda when present (GPU LOCAL_RANK under torchrun)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, metavar="N",
                        help="image-decoding processes (default: min(16, usable CPUs / processes on this machine); "
                             "0: decode in this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_embed)


OVERRIDES = ("loss", "arch", "dim", "image_size", "epochs", "batch_size", "images_per_class", "lr", "optimizer", "lam",
             "temperature", "margin", "hard_threshold", "hard_floor", "sct_warmup", "sct_warm_loss",
             "device", "precision", "compile", "seed", "pretrained", "embedding_bn",
             "eval_every", "eval_ks", "augment", "workers", "max_iters_per_epoch", "val_fraction", "val_by",
             "htl_levels", "htl_beta", "htl_neighbours", "htl_rebuild_every", "htl_tree_images_per_class",
             "gather_embeddings", "sync_batchnorm", "dist_backend")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from training import distributed
    from training.config import describe_provenance, resolve_config
    from training.trainer import train

    try:
        config = resolve_config(args.dataset, args.data_root, args.out, config_file=args.config,
                                overrides={name: getattr(args, name) for name in OVERRIDES},
                                cuda_available=torch.cuda.is_available())
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
    print(f"wrote {report.path}: onnx.checker passed; ONNX Runtime vs torch on {report.images_checked} images: "
          f"max |diff| {report.max_abs_diff_embedding:.1e} (embedding), {report.max_abs_diff_feature_map:.1e} "
          "(feature map, relative)")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from training.embed_gallery import embed_command

    return embed_command(args)
