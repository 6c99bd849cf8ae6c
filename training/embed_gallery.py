"""``sct embed``: embed a gallery's images with the torch checkpoint (GPU, bf16) into index shards.

The shards are those of ``sct index --shard`` (``retrieval.shards``), so
``sct index --merge`` builds the gallery from them: same items.csv as
``sct index --model ONNX``, vectors equal up to the precision used. The server
embeds queries with the ONNX model that each shard carries, so before anything
is embedded the checkpoint is checked to be that model: same preprocessing and
embedding size, and the same embeddings (cosine ≥ ``FP32_MIN_COSINE`` or
``BF16_MIN_COSINE``) of the first ``CHECK_IMAGES`` readable images of the shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import catalog
from catalog import ImageRecord
from core.cpus import cpu_share, default_workers
from core.errors import UserError, UserFileNotFoundError, as_user_error
from core.shards import ShardSpec
from retrieval.embedder import OnnxEmbedder
from retrieval.gallery import GalleryItem
from retrieval.shards import list_sha256, write_shard
from retrieval.sources import Source, index_sources, report_unreadable
from training import distributed
from training.config import TrainConfig
from training.data import EmbeddedRecords, embed_records_kept
from training.export import load_checkpoint_model
from training.model import EmbeddingNet
from training.precision import apply_fp32_policy, autocast_dtype
from training.trainer import pick_device, preprocessing_of

#: Least cosine between the torch and the ONNX embedding of a check image, per precision of the torch path.
FP32_MIN_COSINE = 0.999
BF16_MIN_COSINE = 0.99
#: Images of the shard embedded both ways before the rest are embedded.
CHECK_IMAGES = 8


class ModelMismatchError(UserError, ValueError):
    """The checkpoint is not the model the ONNX file was exported from."""


@dataclass(frozen=True)
class Check:
    """The outcome of ``check_same_model``: the least cosine, on which image, over how many."""

    min_cosine: float
    path: str
    images: int


def default_shard(environ: Mapping[str, str] = os.environ) -> str:
    """``env`` under torchrun (WORLD_SIZE set), else ``0/1``: one shard holding every image."""
    return "env" if "WORLD_SIZE" in environ else "0/1"


def min_cosine_for(amp_dtype: torch.dtype | None) -> float:
    return FP32_MIN_COSINE if amp_dtype is None else BF16_MIN_COSINE


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return "fp32" if amp_dtype is None else "bf16"


def as_records(sources: Sequence[Source]) -> list[ImageRecord]:
    return [ImageRecord(path=path, label=label, split="gallery", chain=chain) for path, label, chain in sources]


def embed_sources(
    model: EmbeddingNet,
    config: TrainConfig,
    sources: Sequence[Source],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None,
    batch_size: int,
    workers: int,
    progress: bool = False,
    desc: str = "embedding",
) -> EmbeddedRecords:
    """``training.data.embed_records_kept`` of the sources with the checkpoint's evaluation transform."""
    return embed_records_kept(
        model,
        as_records(sources),
        preprocessing_of(config),
        device,
        batch_size=batch_size,
        workers=workers,
        amp_dtype=amp_dtype,
        prefetch_factor=4 if workers else None,
        progress=progress,
        desc=desc,
    )


def first_readable(sources: Sequence[Source], count: int) -> list[Source]:
    """The first ``count`` sources whose image loads (fewer when the list holds fewer)."""
    found = []
    for source in sources:
        try:
            catalog.load_rgb(source[0])
        except catalog.ImageLoadError:
            continue
        found.append(source)
        if len(found) == count:
            break
    return found


def check_same_model(
    model: EmbeddingNet,
    config: TrainConfig,
    embedder: OnnxEmbedder,
    sources: Sequence[Source],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    checkpoint: str | os.PathLike[str],
) -> Check | None:
    """Raise ModelMismatchError unless the checkpoint and the ONNX model are the same model; None: no image to try.

    Compares the preprocessing and embedding size, then embeds the first
    ``CHECK_IMAGES`` readable images of ``sources`` with both (ONNX Runtime on CPU).
    """
    mismatch = f"{checkpoint} is not the model {embedder.model_path} was exported from"
    spec = preprocessing_of(config)
    if embedder.preprocessing != spec:
        raise ModelMismatchError(
            f"{mismatch}: preprocessing {embedder.preprocessing} in the ONNX model, " f"{spec} in the checkpoint"
        )
    if embedder.dim != config.dim:
        raise ModelMismatchError(
            f"{mismatch}: embedding size {embedder.dim} in the ONNX model, " f"{config.dim} in the checkpoint"
        )
    sample = first_readable(sources, CHECK_IMAGES)
    if not sample:
        return None
    expected = embedder.embed_paths([path for path, _, _ in sample], batch_size=len(sample), progress=False)
    got = embed_sources(model, config, sample, device, amp_dtype=amp_dtype, batch_size=len(sample), workers=0)
    if len(got.kept) != len(sample) or len(expected.kept_indices) != len(sample):
        raise UserError("an image of the model check became unreadable while it was being read; run again")
    cosines = np.sum(expected.embeddings * got.embeddings, axis=1)
    worst = int(np.argmin(cosines))
    check = Check(float(cosines[worst]), sample[worst][0], len(sample))
    if check.min_cosine < min_cosine_for(amp_dtype):
        raise ModelMismatchError(
            f"{mismatch}: cosine {check.min_cosine:.4f} on {check.path} (torch "
            f"{precision_name(amp_dtype)} vs ONNX Runtime; at least {min_cosine_for(amp_dtype)} "
            f"expected)"
        )
    return check


def embed_command(args: argparse.Namespace) -> int:
    """Check the checkpoint against the ONNX model, embed this shard's images with torch, write the shard."""
    with as_user_error(OSError):  # reading and writing the files the user named (a full disk, a bad permission)
        return _embed(args)


def _embed(args: argparse.Namespace) -> int:
    shard = ShardSpec.parse(args.shard or default_shard())
    for flag, path in (("--checkpoint", args.checkpoint), ("--model", args.model)):
        if not Path(path).is_file():
            raise UserFileNotFoundError(f"{flag} {path} does not exist")
    sources, dataset, split, root = index_sources(
        dataset=args.dataset, data_root=args.data_root, split=args.split, images=args.images
    )
    start, stop = shard.bounds(len(sources))
    mine = sources[start:stop]
    device = pick_device(args.device, distributed.local_rank())  # GPU LOCAL_RANK (0 outside torchrun)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp_dtype = autocast_dtype(device, args.precision)
    apply_fp32_policy(args.precision)  # --precision fp32: no TF32 on CUDA
    model, config = load_checkpoint_model(args.checkpoint)
    model = model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch but the last has one shape
    embedder = OnnxEmbedder(args.model, providers=["CPUExecutionProvider"], threads=cpu_share())
    check = check_same_model(model, config, embedder, mine, device, amp_dtype, checkpoint=args.checkpoint)
    _report_check(check, args, amp_dtype, shard)
    what = f"{len(sources):,} images of {dataset} {split}".rstrip()
    print(
        f"embedding images [{start:,}, {stop:,}) (shard {shard}) of {what} with torch "
        f"{precision_name(amp_dtype)} on {device}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    result = embed_sources(
        model,
        config,
        mine,
        device,
        amp_dtype=amp_dtype,
        batch_size=args.batch_size,
        workers=default_workers() if args.workers is None else args.workers,
        progress=not args.no_progress and distributed.local_rank() == 0,
        desc=f"shard {shard}",
    )
    seconds = time.perf_counter() - started
    report_unreadable([(failure.path, failure.reason) for failure in result.unreadable])
    items = [GalleryItem(row, *mine[position]) for row, position in enumerate(result.kept.tolist())]
    if not items and shard.count == 1:
        raise UserError("none of the images could be read; nothing to index")
    embeddings = result.embeddings if items else np.zeros((0, config.dim), np.float32)
    folder = write_shard(
        args.out,
        shard,
        embeddings,
        items,
        args.model,
        total_images=len(sources),
        image_list_sha256=list_sha256(sources),
        unreadable=len(result.unreadable),
        dataset=dataset,
        split=split,
        image_roots=[root],
    )
    rate = len(mine) / max(seconds, 1e-9)
    print(
        f"wrote shard {shard} to {folder}: {len(items):,} items; {len(mine):,} images in {seconds:.1f} s "
        f"({rate:,.0f} images/s); once all {shard.count} are written: sct index --merge {args.out} --out GALLERY"
    )
    return 0


def _report_check(
    check: Check | None, args: argparse.Namespace, amp_dtype: torch.dtype | None, shard: ShardSpec
) -> None:
    if check is None:
        print(
            f"note: shard {shard} has no readable image to check {args.checkpoint} against {args.model} on",
            file=sys.stderr,
        )
        return
    print(
        f"{args.checkpoint} matches {args.model}: minimum cosine {check.min_cosine:.5f} on {check.images} "
        f"images (torch {precision_name(amp_dtype)}; at least {min_cosine_for(amp_dtype)} required)",
        file=sys.stderr,
    )
