"""GPU speed: every GPU target of the project, each against a baseline of the same run.

Sections (``--sections``; by default all but sct-train, in this order):

  train      one SGD step of the SCT loss on decoded images already on the device (ResNet-50, 256 px):
             the official code's setting in true fp32 (TF32 off for matmuls and cuDNN, contiguous) vs bf16
             autocast + channels_last, and with torch.compile too. Target ≥ 3,000 img/s.
  jpeg       the same step fed by the trainer's own loader (``training.trainer.training_loader``: uint8 pixels
             decoded by --workers processes, persistent, pinned, 4 batches prefetched each) from JPEG files
             written here (16,384 by default: 64 batches an epoch), and the share of each step spent waiting
             for it (the bottleneck); also the loader alone, against the same loader normalising to float in
             its workers (the usual ToTensor+Normalize). Target ≥ 70% of the in-memory rate. ``--profile DIR``
             adds a torch.profiler table and trace of a few steps.
  embed      inference for indexing (what ``sct embed`` runs), true fp32 vs bf16 + channels_last, and bf16
             from the JPEG files through ``embed_records_kept``, timed as the difference of a pass over every
             file and one over half of them, so the loader workers' start-up is not in it. Target ≥ 10,000
             img/s.
  knn        Recall@K by exact search on 60,000 × 512: ``evaluate(knn=TorchKnn)`` on the device against one
             bare ``faiss.knn`` call on the CPU (the design's baseline), with the results checked equal to
             FAISS's. Target: about a second.
  decode     JPEG decoding alone: Pillow in one process (× the usable CPUs, its ceiling) vs nvJPEG through
             torchvision.io.decode_jpeg on the GPU (CUDA only): is GPU decoding worth building?
  sct-train  the rate a real ``sct train`` run logged (``--train-run DIR``: the median ``images_per_s`` of
             its metrics.jsonl), which also pays for the sampler, logging and the per-step loss read-back.

The JPEGs are written by a pool of processes (one per usable CPU) into class folders, the ``--dataset folder``
layout; ``--jpeg-dir DIR`` keeps them there for ``sct train`` and reuses them on the next run.

Timing follows the device method: warm-up, the device synchronised around each timed region, the
median. Each section's rows go to benchmarks/results/gpu_speed.md (date, command, machine, device) and all
numbers so far to --json as soon as it ends. A section that raises is recorded (its name, the exception's
type and message, in the rows and the JSON's "errors") and the next one runs. Exit status 1 if any section
failed or a correctness check did.

    python -m benchmarks.gpu_speed                                   # on the GPU machine: everything (~8 min)
    python -m benchmarks.gpu_speed --sections knn embed decode --jpeg-dir /tmp/jpegs --json a.json   # ~2 min
    python -m benchmarks.gpu_speed --sections train jpeg --jpeg-dir /tmp/jpegs --json b.json         # ~5 min
    python -m benchmarks.gpu_speed --sections sct-train --train-run runs/smoke
    python -m benchmarks.gpu_speed --smoke --no-record               # seconds on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from benchmarks.recording import append_row, machine, now_utc, this_command
from catalog import ImageRecord, decode_rgb
from core.cpus import usable_cpus
from retrieval.metrics import evaluate, knn_exclude_self
from training.config import resolve_config
from training.data import RecordImages, class_index_of, embed_records_kept
from training.knn import TorchKnn
from training.losses import SCTLoss
from training.model import EmbeddingNet
from training.precision import autocast
from training.trainer import build_sampler, preprocessing_of, training_loader
from training.transforms import Normalizer, train_pixels

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_speed.md"
HEADER = """\
# GPU speed: training, the JPEG pipeline, embedding, exact kNN (one run each row group)

`python -m benchmarks.gpu_speed`; every ratio is against a baseline measured in the same run.
Median of the timed steps after warm-up, the device synchronised around each one.

| date (UTC) | command | machine | device | measurement | value | baseline | ratio | target |
|---|---|---|---|---|---|---|---|---|
"""
SECTIONS = ("train", "jpeg", "embed", "knn", "decode", "sct-train")
DEFAULT_SECTIONS = ("train", "jpeg", "embed", "knn", "decode")
SMOKE = dict(
    arch="resnet18",
    image_size=32,
    batch_size=16,
    steps=3,
    warmup=1,
    jpeg_images=48,
    jpeg_size=(80, 60),
    workers=1,
    embed_batch=32,
    knn_items=3000,
    knn_dim=32,
    compile=False,
)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median wall time of ``run`` over ``steps`` calls after ``warmup`` untimed ones, synchronised around each."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        synchronise(device)
        started = time.perf_counter()
        run()
        synchronise(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """fp32 as the official code meant it: TF32 off for matmuls and cuDNN convolutions (both are on by default
    for cuDNN, so an unguarded "fp32" run on an Ampere or later GPU runs its convolutions in TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags() -> dict[str, bool]:
    return {
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def make_model(args, device: torch.device, *, fast: bool, compiled: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = EmbeddingNet(args.arch, 512).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model


def random_inputs(args, device: torch.device, batch: int, *, fast: bool, sets: int = 2) -> list[torch.Tensor]:
    """Normal random images (never zeros), several sets to rotate through so no step reuses the last one's."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    inputs = [
        torch.randn(batch, 3, args.image_size, args.image_size, generator=generator).to(device) for _ in range(sets)
    ]
    return [x.contiguous(memory_format=torch.channels_last) for x in inputs] if fast else inputs


def training_step(
    model: torch.nn.Module, device: torch.device, fast: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = SCTLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(device, torch.bfloat16 if fast else None):
            embeddings = model(images)
        loss = loss_fn(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def cycling(items: list) -> Callable[[], object]:
    state = {"i": 0}

    def next_item():
        state["i"] += 1
        return items[state["i"] % len(items)]

    return next_item


# ------------------------------------------------------------------------------------------------ sections
OFFICIAL = "official (true fp32: TF32 off, contiguous)"


def bench_train(args, device, out, records=None) -> None:
    labels = torch.arange(args.batch_size, device=device) // 2  # P × K with K = 2, as in the paper
    settings = [(OFFICIAL, False, False), ("bf16 + channels_last", True, False)]
    if args.compile:
        settings.append(("bf16 + channels_last + torch.compile", True, True))
    rates, official_flags = {}, {}
    for name, fast, compiled in settings:
        with true_fp32() if not fast else contextlib.nullcontext():
            if not fast:
                official_flags = tf32_flags()  # what the official row runs under, recorded with it
            step = training_step(make_model(args, device, fast=fast, compiled=compiled), device, fast)
            inputs = cycling(random_inputs(args, device, args.batch_size, fast=fast))
            seconds = median_seconds(lambda: step(inputs(), labels), device, args.steps, args.warmup + 3 * compiled)
        rates[name] = args.batch_size / seconds
    official = rates.pop(OFFICIAL)
    best = max(rates, key=rates.get)
    out["train"] = {
        "official": official,
        "official_flags": official_flags,
        **rates,
        "best": best,
        "best_rate": rates[best],
    }
    for name, rate in rates.items():
        out.setdefault("rows", []).append(
            [
                f"train in memory, {name} (img/s)",
                f"{rate:,.0f}",
                f"{official:,.0f} official, true fp32 (TF32 off)",
                f"{rate / official:.2f}",
                "≥ 3,000 img/s",
            ]
        )


def write_jpeg(path: str, index: int, size: tuple[int, int]) -> None:
    """One photo-like JPEG (a smooth random colour field plus noise, quality 90), drawn from its own seed, so
    the file is the same whichever process writes it."""
    rng = np.random.default_rng([0, index])
    coarse = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    noise = rng.integers(-12, 13, (size[1], size[0], 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    image.save(path, quality=90)


def _write_jpeg_chunk(jobs: list[tuple[str, int]], size: tuple[int, int]) -> None:
    for path, index in jobs:
        write_jpeg(path, index, size)


def write_jpegs(
    root: Path, count: int, size: tuple[int, int], per_class: int = 4, processes: int | None = None
) -> list[ImageRecord]:
    """``count`` JPEGs in class folders of ``per_class`` (``root/<class>/<n>.jpg``, the ``--dataset folder``
    layout), written by ``processes`` processes (default: the usable CPUs; 1: in this process).

    A folder already holding this set (same count, size and classes, per ``jpegs.json``) is reused as it is."""
    root = Path(root)
    records = [
        ImageRecord(
            path=str(root / f"c{i // per_class:05d}" / f"{i:06d}.jpg"), label=f"c{i // per_class:05d}", split="train"
        )
        for i in range(count)
    ]
    stamp, manifest = {"count": count, "size": list(size), "per_class": per_class}, root / "jpegs.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == stamp:
        return records
    for label in sorted({r.label for r in records}):
        (root / label).mkdir(parents=True, exist_ok=True)
    jobs = [(r.path, i) for i, r in enumerate(records)]
    processes = usable_cpus() if processes is None else processes
    if processes <= 1:
        _write_jpeg_chunk(jobs, size)
    else:
        chunk = max(1, len(jobs) // (4 * processes))
        with ProcessPoolExecutor(max_workers=processes) as pool:
            for done in [
                pool.submit(_write_jpeg_chunk, jobs[start : start + chunk], size)
                for start in range(0, len(jobs), chunk)
            ]:
                done.result()
    manifest.write_text(json.dumps(stamp))
    return records


def forever(loader) -> Iterator:
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_jpeg(args, device, out, records: list[ImageRecord]) -> None:
    config = resolve_config(
        "folder",
        str(Path(records[0].path).parents[1]),
        "unused",
        overrides=dict(
            arch=args.arch,
            image_size=args.image_size,
            batch_size=args.batch_size,
            images_per_class=2,
            workers=args.workers,
            device=device.type,
        ),
    )
    spec = preprocessing_of(config)
    class_index = class_index_of(records)
    sampler = build_sampler([class_index[r.label] for r in records], len(class_index), config)
    normalize = Normalizer(spec)

    # the loader alone: uint8 pixels (ours) vs normalising to float in the workers (the usual ToTensor+Normalize)
    loader_rate = {}
    for name, pixels in (("float", T.Compose([train_pixels(spec), Normalizer(spec)])), ("uint8", train_pixels(spec))):
        loader = training_loader(RecordImages(records, class_index, pixels), sampler, config, device)
        batches = forever(loader)
        for _ in range(args.warmup + 1):  # starts the workers, fills the prefetch queue
            next(batches)
        started, images = time.perf_counter(), 0
        for _ in range(args.steps * 2):
            images += len(next(batches).labels)
        loader_rate[name] = images / (time.perf_counter() - started)
        del batches, loader

    compiled = out.get("train", {}).get("best", "").endswith("compile")  # the in-memory winner's setting
    model = make_model(args, device, fast=True, compiled=compiled)
    step = training_step(model, device, fast=True)
    loader = training_loader(RecordImages(records, class_index, train_pixels(spec)), sampler, config, device)
    training_batches = forever(loader)

    def one_step() -> float:
        """Train on the next batch; the seconds spent waiting for the loader."""
        waited = time.perf_counter()
        batch = next(training_batches)
        waited = time.perf_counter() - waited
        pixels = batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        step(normalize(pixels), batch.labels.to(device, non_blocking=True))
        return waited

    for _ in range(args.warmup + 3 * compiled):
        one_step()
    synchronise(device)
    started, waits = time.perf_counter(), []
    for _ in range(args.steps * 2):
        waits.append(one_step())
    synchronise(device)
    elapsed = time.perf_counter() - started
    rate = args.steps * 2 * args.batch_size / elapsed
    if args.profile:
        profile_steps(one_step, device, Path(args.profile))
    training_batches = loader = None  # the loader's worker processes end
    in_memory = out.get("train", {}).get("best_rate")
    out["jpeg"] = {
        "loader_only": loader_rate["uint8"],
        "loader_only_float": loader_rate["float"],
        "training": rate,
        "wait_fraction": sum(waits) / elapsed,
        "workers": args.workers,
        "images": len(records),
        "size": list(args.jpeg_size),
    }
    rows = out.setdefault("rows", [])
    rows.append(
        [
            f"train from JPEG {args.jpeg_size[0]}×{args.jpeg_size[1]}, {args.workers} workers (img/s); "
            f"{100 * sum(waits) / elapsed:.0f}% of the time waiting for the loader",
            f"{rate:,.0f}",
            f"{in_memory:,.0f} in memory" if in_memory else "—",
            f"{rate / in_memory:.2f}" if in_memory else "—",
            "≥ 0.70",
        ]
    )
    rows.append(
        [
            f"the training loader alone, {args.workers} workers, uint8 batches (img/s)",
            f"{loader_rate['uint8']:,.0f}",
            f"{loader_rate['float']:,.0f} float batches",
            f"{loader_rate['uint8'] / loader_rate['float']:.2f}",
            "—",
        ]
    )


def profile_steps(one_step: Callable[[], float], device: torch.device, folder: Path) -> None:
    """A torch.profiler table (by self time) and a Chrome trace of 5 steps of the JPEG-fed training."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(5):
            one_step()
        synchronise(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (folder / "profile.txt").write_text(profiler.key_averages().table(sort_by=key, row_limit=40))
    profiler.export_chrome_trace(str(folder / "trace.json"))


def bench_embed(args, device, out, records: list[ImageRecord]) -> None:
    rates = {}
    for name, fast in (("fp32", False), ("bf16 + channels_last", True)):
        with true_fp32() if not fast else contextlib.nullcontext():
            model = make_model(args, device, fast=fast).eval()
            inputs = cycling(random_inputs(args, device, args.embed_batch, fast=fast))

            def run() -> None:
                with torch.no_grad(), autocast(device, torch.bfloat16 if fast else None):
                    model(inputs())

            rates[name] = args.embed_batch / median_seconds(run, device, args.steps, args.warmup)
    model = make_model(args, device, fast=True)
    config = resolve_config("folder", "unused", "unused", overrides=dict(arch=args.arch, image_size=args.image_size))

    def embed(part):
        return embed_records_kept(
            model,
            part,
            preprocessing_of(config),
            device,
            batch_size=args.embed_batch,
            workers=args.workers,
            amp_dtype=torch.bfloat16,
            prefetch_factor=4,
        )

    def seconds(part) -> float:
        synchronise(device)
        started = time.perf_counter()
        embed(part)
        synchronise(device)
        return time.perf_counter() - started

    # Each pass starts its own loader workers: the rate is the difference of a pass over every file and one over
    # half of them, so the workers' start-up (in both) cancels and only the images in between are timed.
    half = records[: len(records) // 2]
    embed(half)  # warm-up: cuDNN's choices, the page cache
    whole_s, half_s = seconds(records), seconds(half)
    from_jpeg = (len(records) - len(half)) / max(whole_s - half_s, 1e-9)
    out["embed"] = {
        **rates,
        "from_jpeg": from_jpeg,
        "from_jpeg_all_s": whole_s,
        "from_jpeg_half_s": half_s,
        "images": len(records),
    }
    rows = out.setdefault("rows", [])
    rows.append(
        [
            "embed in memory, bf16 + channels_last (img/s)",
            f"{rates['bf16 + channels_last']:,.0f}",
            f"{rates['fp32']:,.0f} true fp32 (TF32 off)",
            f"{rates['bf16 + channels_last'] / rates['fp32']:.2f}",
            "≥ 10,000 img/s",
        ]
    )
    rows.append(
        [
            f"embed from JPEG, bf16, {args.workers} workers, worker start-up excluded (img/s)",
            f"{from_jpeg:,.0f}",
            f"{rates['bf16 + channels_last']:,.0f} in memory",
            f"{from_jpeg / rates['bf16 + channels_last']:.2f}",
            "—",
        ]
    )


def knn_data(items: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in SOP-like classes of about 5, noisy enough that Recall@1 is far from 0 and 1."""
    rng = np.random.default_rng(2)
    classes = max(2, items // 5)
    labels = rng.integers(0, classes, items)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    vectors = centres[labels] + 0.9 * rng.standard_normal((items, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def bench_knn(args, device, out, records=None) -> bool:
    """Recall@K on the device vs a bare FAISS CPU search; False if the two disagree."""
    vectors, labels = knn_data(args.knn_items, args.knn_dim)
    ks = (1, 10, 100, 1000) if args.knn_items > 2000 else (1, 2, 4, 8)
    depth = max(ks)
    started = time.perf_counter()
    knn_exclude_self(vectors, vectors, depth, query_ids=np.arange(len(vectors)))
    faiss_seconds = time.perf_counter() - started
    runs: list[dict] = []  # the timed evaluations' results; the last one is checked against FAISS
    on_device = median_seconds(
        lambda: runs.append(evaluate(vectors, labels, ks=ks, knn=TorchKnn(device))), device, max(1, args.steps // 2), 1
    )
    ours = runs[-1]
    reference = evaluate(vectors, labels, ks=ks)  # FAISS on the CPU
    agree = all(abs(ours[key] - reference[key]) <= 2 / len(vectors) for key in reference)  # ties may swap one
    out["knn"] = {
        "items": args.knn_items,
        "dim": args.knn_dim,
        "ks": list(ks),
        "evaluate_device_s": on_device,
        "bare_faiss_cpu_s": faiss_seconds,
        "agree_with_faiss": agree,
        "recall": {k: ours[f"recall@{k}"] for k in ks},
    }
    out.setdefault("rows", []).append(
        [
            f"Recall@{{{', '.join(map(str, ks))}}} + MAP@R of {args.knn_items:,} × {args.knn_dim} on {device.type} (s); "
            f"{'equal to' if agree else 'DIFFERENT FROM'} FAISS's",
            f"{on_device:.2f}",
            f"{faiss_seconds:.2f} bare faiss.knn, CPU",
            f"{on_device / faiss_seconds:.2f}",
            "about 1 s",
        ]
    )
    return agree


DECODE_FILES = 4096  # enough for a steady rate; all 16,384 would cost ~20 s of a short GPU session


def bench_decode(args, device, out, records: list[ImageRecord]) -> None:
    files = [Path(r.path).read_bytes() for r in records[:DECODE_FILES]]
    started = time.perf_counter()
    for data in files:
        decode_rgb(data)
    pil_one_process = len(files) / (time.perf_counter() - started)
    result = {"pil_one_process": pil_one_process, "pil_ceiling": pil_one_process * usable_cpus()}
    row = [
        "JPEG decode, Pillow in one process (img/s)",
        f"{pil_one_process:,.0f}",
        f"× {usable_cpus()} CPUs = {pil_one_process * usable_cpus():,.0f}",
        "—",
        "—",
    ]
    if device.type == "cuda":
        from torchvision.io import decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in files[: args.batch_size]]
        seconds = median_seconds(lambda: decode_jpeg(data, device=device), device, args.steps, args.warmup)
        result["nvjpeg"] = len(data) / seconds
        row = [
            "JPEG decode, nvJPEG batch on the GPU (img/s)",
            f"{result['nvjpeg']:,.0f}",
            f"{result['pil_ceiling']:,.0f} Pillow × {usable_cpus()} CPUs",
            f"{result['nvjpeg'] / result['pil_ceiling']:.2f}",
            "—",
        ]
    out["decode"] = result
    out.setdefault("rows", []).append(row)


def bench_sct_train(args, device, out, records=None) -> None:
    """The rate a real ``sct train`` run logged (``images_per_s`` of its metrics.jsonl step records): the median
    over its steps after the first 5 of each epoch (start-up, cuDNN's choices), against the in-memory rate when
    the train section ran in the same invocation."""
    if not args.train_run:
        raise ValueError("the sct-train section reads a run folder: give --train-run DIR")
    metrics = Path(args.train_run) / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "images_per_s" in s]
    by_epoch: dict[object, list[float]] = {}
    for record in steps:
        by_epoch.setdefault(record.get("epoch"), []).append(record["images_per_s"])
    rates = [rate for epoch_rates in by_epoch.values() for rate in epoch_rates[5:]]
    if not rates:
        raise ValueError(f"{metrics} holds no step past the 5th of an epoch with images_per_s")
    rate = statistics.median(rates)
    in_memory = out.get("train", {}).get("best_rate")
    out["sct_train"] = {"run": str(args.train_run), "images_per_s": rate, "steps": len(rates)}
    out.setdefault("rows", []).append(
        [
            f"sct train, median images_per_s of {len(rates)} steps in {args.train_run}/metrics.jsonl (img/s)",
            f"{rate:,.0f}",
            f"{in_memory:,.0f} in memory" if in_memory else "—",
            f"{rate / in_memory:.2f}" if in_memory else "—",
            "≥ 3,000 img/s",
        ]
    )


SECTION_RUNS: dict[str, Callable] = {
    "train": bench_train,
    "jpeg": bench_jpeg,
    "embed": bench_embed,
    "knn": bench_knn,
    "decode": bench_decode,
    "sct-train": bench_sct_train,
}
NEEDS_JPEGS = {"jpeg", "embed", "decode"}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help=f"sections to run, in this order (default: {' '.join(DEFAULT_SECTIONS)}; sct-train needs --train-run)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256, help="training batch (P × K, K = 2)")
    parser.add_argument("--embed-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the JPEG run times twice as many)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile (default on; a minute or two to compile)",
    )
    parser.add_argument(
        "--jpeg-images",
        type=int,
        default=16384,
        help="JPEG files to write for the jpeg, embed and decode sections (default 16384: 64 training batches of "
        "256 per epoch, so the loader's restart at each epoch does not dominate)",
    )
    parser.add_argument(
        "--jpeg-dir",
        metavar="DIR",
        help="write the JPEGs here and keep them (a --dataset folder layout: DIR/<class>/<n>.jpg), reusing a set "
        "already there; default: a temporary folder",
    )
    parser.add_argument(
        "--jpeg-size",
        type=int,
        nargs=2,
        default=(500, 375),
        metavar=("W", "H"),
        help="their size (default 500 × 375, about CUB's and SOP's)",
    )
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="decoding processes (default: all CPUs)")
    parser.add_argument("--knn-items", type=int, default=60_000)
    parser.add_argument("--knn-dim", type=int, default=512)
    parser.add_argument(
        "--train-run", metavar="DIR", help="the sct-train section: a run folder of `sct train` (its metrics.jsonl)"
    )
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler table and trace of the JPEG run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script in seconds on a CPU")
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown table to append rows to")
    parser.add_argument("--no-record", action="store_true", help="print the rows, do not append them")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.jpeg_size = tuple(args.jpeg_size)
    return args


def write_json(path: str | None, out: dict) -> None:
    """The numbers so far, replaced whole (a temporary file renamed over it: never half written)."""
    if path:
        scratch = Path(f"{path}.part")
        scratch.write_text(json.dumps(out, indent=2, default=str))
        scratch.replace(path)


def run_section(section: str, args, device, out: dict, records: list[ImageRecord]) -> bool:
    """Run one section; False if it raised (its error recorded in ``out``) or its correctness check failed."""
    started = time.perf_counter()
    try:
        correct = SECTION_RUNS[section](args, device, out, records) is not False
    except Exception as error:  # a late section's failure must not cost the earlier ones' figures
        message = f"{type(error).__name__}: {error}"
        out.setdefault("errors", []).append({"section": section, "type": type(error).__name__, "message": str(error)})
        out.setdefault("rows", []).append([f"section {section} FAILED: {message}"[:300], "—", "—", "—", "—"])
        print(f"error: section {section} failed: {message}", file=sys.stderr)
        correct = False
    out.setdefault("seconds", {})[section] = round(time.perf_counter() - started, 1)
    print(f"{section}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return correct


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "results"},
        "sections": list(args.sections),
        "errors": [],
    }
    stamp = [now_utc(), this_command("benchmarks.gpu_speed", argv), machine(), out["device"]]
    correct = True
    with contextlib.ExitStack() as stack:
        records: list[ImageRecord] = []
        if NEEDS_JPEGS & set(args.sections):
            folder = args.jpeg_dir or stack.enter_context(tempfile.TemporaryDirectory())
            started = time.perf_counter()
            records = write_jpegs(Path(folder), args.jpeg_images, args.jpeg_size)
            out["jpeg_files_s"] = round(time.perf_counter() - started, 1)
        for section in args.sections:
            recorded = len(out.get("rows", []))
            correct &= run_section(section, args, device, out, records)
            # this section's rows and every number so far go to disk now: a later failure or kill keeps them
            for row in out.get("rows", [])[recorded:]:
                if not args.no_record:
                    append_row(args.results, HEADER, stamp + row)
                print(f"{row[0]}: {row[1]}  (baseline {row[2]}, ratio {row[3]}, target {row[4]})", flush=True)
            write_json(args.json, out)
    if out["errors"]:
        print(
            f"error: {len(out['errors'])} section(s) failed: {', '.join(e['section'] for e in out['errors'])}",
            file=sys.stderr,
        )
    if out.get("knn", {}).get("agree_with_faiss") is False:
        print("error: the device's Recall@K differs from FAISS's", file=sys.stderr)
    return 0 if correct else 1


if __name__ == "__main__":
    raise SystemExit(main())
