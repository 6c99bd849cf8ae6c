"""Distributed training throughput: one process vs two gloo processes on the CPU, same global batch.

Each configuration runs in freshly spawned processes: forward, SCT loss, backward
(DistributedDataParallel's gradient all-reduce with two processes), SGD step, on
random in-memory images. One process takes the whole global batch; two take half
each, mining within their half ("local") or from the gathered global batch
(--gather-embeddings, "gather"). Every process gets --threads-per-process CPU
threads, as each would get one GPU. Rank 0 times the steps after a warm-up; the
median step time gives global images/s. One row is appended to
benchmarks/results/ddp_scaling.md.

    python -m benchmarks.ddp_scaling                                   # resnet18, 32 px, global batch 64
    python -m benchmarks.ddp_scaling --arch resnet50 --image-size 64 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

from benchmarks.recording import append_row, machine, now_utc, this_command
from training import distributed
from training.losses import SCTLoss
from training.model import EmbeddingNet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ddp_scaling.md"
HEADER = """\
# Distributed training throughput: one process vs two (gloo, CPU)

One SGD step of the SCT loss on in-memory random images, the same global batch split over the processes
(benchmarks/ddp_scaling.py). "local": each process mines within its half; "gather": --gather-embeddings.
Median step time after warm-up, measured on rank 0; images/s count the global batch. Scaling = 2-process
images/s ÷ 1-process images/s (2.0 would be perfect).

On the 2-core development machine the two processes share the only two cores with everything else, and gloo
all-reduces the gradients over loopback TCP on the same CPUs, so this figure measures the overhead of the
distributed code path (correctness cost), not GPU scaling. NCCL on GPUs is untested here (docs/DISTRIBUTED.md).

| date (UTC) | command | machine | arch | px | global batch | threads/process | 1 process img/s | 2 local img/s | 2 gather img/s | scaling local | scaling gather |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world: int, port: int, gather: bool, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads_per_process)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = EmbeddingNet(args.arch, args.dim)
        trained = distributed.wrap(model, torch.device("cpu"))
        local = args.batch_size // world
        images = torch.randn(local, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(rank))
        labels = (torch.arange(local) + rank * local) // 2  # P × K with K = 2, whole classes per process
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss_fn = SCTLoss()
        times = []
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            embeddings = trained(images)
            if gather:
                loss = distributed.global_batch_loss(loss_fn, embeddings, labels)
            else:
                loss = loss_fn(embeddings, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        distributed.cleanup()


def images_per_second(world: int, gather: bool, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "times.json"
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), gather, args, str(out)), nprocs=world)
        times = json.loads(out.read_text())
    return args.batch_size / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ddp_scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (P × K with K = 2)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.batch_size % 4:
        parser.error("--batch-size must be a multiple of 4 (two processes × whole classes of K = 2)")
    rates = {}
    for name, world, gather in (("single", 1, False), ("local", 2, False), ("gather", 2, True)):
        rates[name] = images_per_second(world, gather, args)
        print(f"{name}: {rates[name]:,.1f} img/s (median of {args.steps} steps)", file=sys.stderr)
    row = [
        now_utc(),
        this_command("benchmarks.ddp_scaling"),
        machine(f"torch {torch.__version__}"),
        args.arch,
        str(args.image_size),
        str(args.batch_size),
        str(args.threads_per_process),
        f"{rates['single']:,.1f}",
        f"{rates['local']:,.1f}",
        f"{rates['gather']:,.1f}",
        f"{rates['local'] / rates['single']:.2f}",
        f"{rates['gather'] / rates['single']:.2f}",
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
