"""How many image-decoding processes a torch process gets by default: its share of the machine's CPUs."""
from __future__ import annotations

import os
from collections.abc import Mapping

from retrieval.embedder import usable_cpus

MAX_DEFAULT_WORKERS = 16  # a ResNet-50 step at 3,000 img/s needs about this many Pillow decoders (gpu_speed.md)


def processes_on_this_machine(environ: Mapping[str, str] = os.environ) -> int:
    """LOCAL_WORLD_SIZE under torchrun, else 1: how many processes share this machine's CPUs."""
    return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(environ: Mapping[str, str] = os.environ) -> int:
    """min(16, this process's share of the usable CPUs), at least 1."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cpus() // processes_on_this_machine(environ)))
