"""Memory and time of decoding one upload for the model, bounded (the server's path) against a full decode.

For each image, a fresh Python process decodes and preprocesses it for a ResNet at 256 px (resize 292) and
reports its peak resident memory above what it held before (VmHWM − VmRSS) and the wall time, median of
``--repeats``. "full" decodes every pixel (the path before uploads were bounded); "bounded" is
``catalog.decode_rgb(..., min_side=spec.decode_side)``: JPEG draft mode, then reduction in place. The worst
case is a 16-bit PNG of 6300² pixels, just under the 40-megapixel limit, which compresses to a few hundred KB.
One row per image is appended to benchmarks/results/upload_memory.md.

    python -m benchmarks.upload_memory
    python -m benchmarks.upload_memory --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.fixtures.photos import amplifier_png, photo_corpus
from benchmarks.recording import append_row, machine, now_utc, this_command

RESULTS = Path(__file__).parent / "results" / "upload_memory.md"
HEADER = """# Decoding one upload: peak memory and time, bounded vs full decode

`benchmarks/upload_memory.py`. Each cell: a fresh process decodes and preprocesses the image for a ResNet at
256 px (resize 292); peak resident memory above the process's size before (MiB), and wall time (ms), median of
the repeats. "full": every pixel decoded (before); "bounded": JPEG draft mode and reduction in place to at
least 4 × 292 px on the shorter side (`catalog.decode_rgb(..., min_side=...)`, what `sct serve` and
`sct index` do now). Ratio = full / bounded.

| date (UTC) | command | machine | image | bytes | full MiB | bounded MiB | memory ratio | full ms | bounded ms | time ratio |
|---|---|---|---|---|---|---|---|---|---|---|
"""

#: Runs in the child: decode + preprocess once, print peak-above-start MiB and seconds as JSON.
CHILD = """
import json, sys, time
from pathlib import Path
from catalog import decode_rgb
from retrieval.preprocessing import Preprocessing, preprocess
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
data = Path(sys.argv[1]).read_bytes()
spec = Preprocessing(256, 292, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
min_side = spec.decode_side if sys.argv[2] == "bounded" else None
start = status("VmRSS")
started = time.perf_counter()
pixels = preprocess(decode_rgb(data, max_pixels=40_000_000, min_side=min_side), spec)
seconds = time.perf_counter() - started
print(json.dumps({"peak_mib": status("VmHWM") - start, "seconds": seconds}))
"""


def measure(path: Path, mode: str, repeats: int) -> tuple[float, float]:
    """Median peak MiB and median milliseconds of ``repeats`` fresh processes."""
    peaks, times = [], []
    root = Path(__file__).resolve().parents[1]
    for _ in range(repeats):
        output = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), mode], check=True, capture_output=True, text=True, cwd=root
        ).stdout
        result = json.loads(output.strip().splitlines()[-1])
        peaks.append(result["peak_mib"])
        times.append(result["seconds"] * 1000)
    return statistics.median(peaks), statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.upload_memory",
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n  python -m benchmarks.upload_memory\n"
        "  python -m benchmarks.upload_memory --repeats 1 --no-record",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per image and path (default 3)")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    args = parser.parse_args(argv)
    images = [("amplifier-6300x6300-16bit.png", amplifier_png())]
    images += [(photo.name, photo.data) for photo in photo_corpus()]
    with tempfile.TemporaryDirectory() as folder:
        for name, data in images:
            path = Path(folder) / name
            path.write_bytes(data)
            full_mib, full_ms = measure(path, "full", args.repeats)
            bounded_mib, bounded_ms = measure(path, "bounded", args.repeats)
            row = [
                now_utc(),
                this_command("benchmarks.upload_memory", argv),
                machine(),
                name,
                f"{len(data):,}",
                f"{full_mib:.0f}",
                f"{bounded_mib:.0f}",
                f"{full_mib / bounded_mib:.1f}",
                f"{full_ms:.0f}",
                f"{bounded_ms:.0f}",
                f"{full_ms / bounded_ms:.1f}",
            ]
            print(" | ".join(row[3:]), flush=True)
            if not args.no_record:
                append_row(RESULTS, HEADER, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
