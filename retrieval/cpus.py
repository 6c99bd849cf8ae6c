"""The CPUs this process may use; standard library only, so training can count CPUs without ONNX Runtime."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
