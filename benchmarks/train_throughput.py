"""Training images/s: bf16 autocast + channels_last (ours) vs fp32 contiguous (the official code's setting).

One full training step each time: forward, SCT loss on a P×K batch, backward,
SGD step, on decoded in-memory images (the input pipeline is measured
separately). Both settings run in the same process on the same random data,
after a warm-up; the device is synchronised before every clock read, and the
median step time gives images/s. One row is appended to
benchmarks/results/train_throughput.md.

    python benchmarks/train_throughput.py                       # ResNet-50, 256 px, batch 128 (the GPU target)
    python benchmarks/train_throughput.py --arch resnet18 --image-size 64 --batch-size 64   # a CPU-sized run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.recording import append_row, machine, now_utc, this_command  # noqa: E402
from training.losses import SCTLoss  # noqa: E402
from training.model import EmbeddingNet  # noqa: E402
from training.precision import autocast  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_throughput.md"
HEADER = """\
# Training throughput: one SGD step of the SCT loss on in-memory images

"ours" = bf16 autocast + channels_last; "official" = fp32, contiguous (the official code's setting).
Median of the timed steps after warm-up, device synchronised around each step. Target (DESIGN.md §4):
≥ 3,000 img/s for ResNet-50 at 256 px on one H100.

| date (UTC) | command | machine | device | arch | px | batch | official img/s | ours img/s | ratio |
|---|---|---|---|---|---|---|---|---|---|
"""


def step_times(arch: str, size: int, batch: int, device: torch.device, fast: bool, steps: int,
               warmup: int) -> list[float]:
    torch.manual_seed(0)
    model = EmbeddingNet(arch, 512).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) // 2  # P × K with K = 2, as in the paper
    if fast:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = SCTLoss()
    times = []
    for step in range(warmup + steps):
        _synchronise(device)
        started = time.perf_counter()
        with autocast(device, torch.bfloat16 if fast else None):
            embeddings = model(images)
        loss = loss_fn(embeddings.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronise(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    rates = {}
    for name, fast in (("official", False), ("ours", True)):
        times = step_times(args.arch, args.image_size, args.batch_size, device, fast, args.steps, args.warmup)
        rates[name] = args.batch_size / statistics.median(times)
        print(f"{name}: {rates[name]:,.0f} img/s (median of {len(times)} steps)", file=sys.stderr)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    row = [now_utc(), this_command("benchmarks/train_throughput.py"), machine(), device_name, args.arch,
           str(args.image_size), str(args.batch_size), f"{rates['official']:,.0f}", f"{rates['ours']:,.0f}",
           f"{rates['ours'] / rates['official']:.2f}"]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
