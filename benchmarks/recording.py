"""Shared by the benchmark scripts: describe the machine and append one row to a results table."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path


def machine(extra: str = "") -> str:
    """CPU model, usable CPUs and OS, so rows recorded on shared machines can be compared."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [model, f"{cpus} CPUs ({os.cpu_count()} on host)", *([extra] if extra else []), platform.system()]
    return ", ".join(parts)


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")


def this_command(module: str, args: Sequence[str] | None = None) -> str:
    """``python -m module`` with ``args`` (default this process's), the command line that ran a benchmark, quoted
    for a Markdown cell."""
    return "`" + shlex.join(["python", "-m", module, *(sys.argv[1:] if args is None else args)]) + "`"


def append_row(path: Path, header: str, row: list[str]) -> str:
    """Append ``row`` to the Markdown table in ``path`` (created with ``header``); returns the line."""
    line = "| " + " | ".join(row) + " |"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(header, encoding="utf-8")
    with path.open("a", encoding="utf-8") as results:
        results.write(line + "\n")
    return line
