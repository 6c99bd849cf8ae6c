"""The CPUs this process may use, and how many image-decoding processes a process gets by default.

Standard library only, so training counts CPUs without ONNX Runtime. A process's default share is never more
than the CPUs it may use, the most torch's DataLoader accepts without a warning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MAX_DEFAULT_WORKERS = 16  # a ResNet-50 step at 3,000 img/s needs about this many Pillow decoders (gpu_speed.md)
MAX_CPU_TRAINING_WORKERS = 4  # a step on the CPU is slow enough for a few decoders; the other cores run the model


def processes_on_this_machine(environ: Mapping[str, str] = os.environ) -> int:
    """LOCAL_WORLD_SIZE under torchrun, else 1: how many processes share this machine's CPUs."""
    return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))


def cpu_share(environ: Mapping[str, str] = os.environ) -> int:
    """This process's share of the usable CPUs, at least 1."""
    return max(1, usable_cpus() // processes_on_this_machine(environ))


RESERVED_CPUS = 2  # of each process's share, left to its main thread (launching the steps) and its pinning thread


def default_workers(environ: Mapping[str, str] = os.environ, *, cap: int = MAX_DEFAULT_WORKERS) -> int:
    """min(cap, this process's share of the usable CPUs less RESERVED_CPUS), at least 1."""
    return max(1, min(cap, cpu_share(environ) - RESERVED_CPUS))
