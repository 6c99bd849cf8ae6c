"""Adding 10% more images to a gallery (`sct index --add`) against rebuilding it whole (`sct index`), same run.

Exports a randomly initialised ResNet (speed does not depend on the weights) to ONNX, writes N photo-like
JPEGs, builds a gallery of the first 90% (untimed), then times, interleaved, REPEATS times each:
  rebuild  `sct index --model M --images ALL --out G`            embeds all N images and builds the index
  add      `sct index --add --images ALL --out COPY`              embeds the 10% the gallery lacks and adds them
each from a fresh copy of the 90% gallery. The median of each and their ratio go to
benchmarks/results/gallery_update.md, with the command and machine.

    python -m benchmarks.gallery_update                                  # ResNet-18, 128 px, 2,000 images, flat
    python -m benchmarks.gallery_update --index-type hnsw --images 1000
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

from benchmarks.recording import append_row, machine, now_utc, this_command
from benchmarks.search_latency import export_model, photo_like_jpeg
from retrieval.gallery import Gallery
from sct.cli import main as sct

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gallery_update.md"
HEADER = """\
# Adding 10% more images to a gallery vs rebuilding it, same run

"rebuild" = `sct index` of all N images; "add" = `sct index --add` of the same folder into a copy of the
gallery of the first 90% (it embeds only the new 10%). Medians of interleaved repeats; ratio = rebuild / add.

| date (UTC) | command | machine | model | index | images (new) | rebuild s | add s | ratio | repeats |
|---|---|---|---|---|---|---|---|---|---|
"""


def run_sct(argv: list[str]) -> float:
    """Seconds one `sct` command takes in this process (its output swallowed); raises if it fails."""
    started = time.perf_counter()
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()) as err:
        status = sct(argv)
    if status != 0:
        raise RuntimeError(f"sct {' '.join(argv)} exited {status}: {err.getvalue()[-2000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gallery_update",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--index-type", default="flat", choices=["flat", "ivf-flat", "hnsw"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model.onnx"
        child = multiprocessing.get_context("spawn").Process(
            target=export_model, args=(str(model), args.arch, args.dim, args.image_size)
        )
        child.start()
        child.join()
        base_count = args.images * 9 // 10
        photos = scratch / "photos"
        photos.mkdir()
        index_options = ["--index-type", args.index_type]
        base = scratch / "base"
        for i in range(args.images):
            if i == base_count:  # the gallery of the first 90%, before the rest arrives
                run_sct(["index", "--model", str(model), "--images", str(photos), "--out", str(base), *index_options])
            (photos / f"{i:06d}.jpg").write_bytes(photo_like_jpeg(i, (400, 300)))
        rebuild_s, add_s = [], []
        for repeat in range(args.repeats):
            rebuilt = scratch / f"rebuilt-{repeat}"
            rebuild_s.append(
                run_sct(
                    ["index", "--model", str(model), "--images", str(photos), "--out", str(rebuilt), *index_options]
                )
            )
            grown = scratch / f"grown-{repeat}"
            shutil.copytree(base, grown)
            add_s.append(run_sct(["index", "--add", "--images", str(photos), "--out", str(grown)]))
            counts = {len(Gallery.load(folder).items) for folder in (rebuilt, grown)}
            if counts != {args.images}:
                raise RuntimeError(f"galleries of {counts} items, {args.images} expected")
            print(f"repeat {repeat + 1}: rebuild {rebuild_s[-1]:.2f} s, add {add_s[-1]:.2f} s", file=sys.stderr)
    rebuild, add = statistics.median(rebuild_s), statistics.median(add_s)
    row = [
        now_utc(),
        this_command("benchmarks.gallery_update"),
        machine(),
        f"{args.arch} {args.image_size} px, {args.dim}-d",
        args.index_type,
        f"{args.images:,} ({args.images - base_count:,})",
        f"{rebuild:.2f}",
        f"{add:.2f}",
        f"{rebuild / add:.1f}",
        str(args.repeats),
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
