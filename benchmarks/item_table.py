"""Memory of a gallery's items in the server: ItemTable's columns vs a list of GalleryItem objects.

Writes an items.csv of N Hotels-50K-like rows (path, hotel label, chain), then in
this one process measures the resident-memory growth of ``read_items`` (the
ItemTable every server worker holds) and of the same rows as a list of
``GalleryItem`` objects (what the server held before), the load time, and the time
to fetch the 10 results of a query. One row is appended to
benchmarks/results/item_table.md.

    python -m benchmarks.item_table                 # 1,000,000 rows
    python -m benchmarks.item_table --rows 2000000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.recording import append_row, machine, now_utc, this_command
from retrieval.items import read_items

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "item_table.md"
HEADER = """\
# A gallery's items in memory: ItemTable vs a list of GalleryItem (same process, same file)

Resident-memory growth (from /proc/self/statm) while each is held; fetch = the 10 items of one result list.

| date (UTC) | command | machine | rows | items.csv MiB | ItemTable MiB | list MiB | list / table | load s | fetch 10 µs |
|---|---|---|---|---|---|---|---|---|---|
"""


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def write_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    names = rng.integers(10**9, size=rows)
    with path.open("w", encoding="utf-8") as file:
        file.write("id,path,label,chain\n")
        for i in range(rows):
            file.write(f"{i},/data/hotels50k/images/train/{i % 92}/{i // 11}/{names[i]}.jpg,{i // 11},{i % 92}\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.item_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "items.csv"
        write_csv(path, args.rows)
        gc.collect()
        before = resident_bytes()
        started = time.perf_counter()
        table = read_items(path)
        load_seconds = time.perf_counter() - started
        table_bytes = resident_bytes() - before
        rng = np.random.default_rng(1)
        fetches = []
        for _ in range(200):
            ids = rng.integers(0, len(table), 10)
            started = time.perf_counter()
            [table[int(i)] for i in ids]
            fetches.append(time.perf_counter() - started)
        gc.collect()
        before = resident_bytes()
        as_list = list(table)
        list_bytes = resident_bytes() - before
        assert as_list[-1] == table[-1]
        file_mib = path.stat().st_size / 2**20
    mib = 2**20
    row = [
        now_utc(),
        this_command("benchmarks.item_table"),
        machine(),
        f"{args.rows:,}",
        f"{file_mib:.0f}",
        f"{table_bytes / mib:.0f}",
        f"{list_bytes / mib:.0f}",
        f"{list_bytes / table_bytes:.1f}",
        f"{load_seconds:.1f}",
        f"{1e6 * statistics.median(fetches):.0f}",
    ]
    print(append_row(RESULTS, HEADER, row) if not args.no_record else row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
