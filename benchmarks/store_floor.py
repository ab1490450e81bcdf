"""The durable store's system calls alone: what no receiver on this disk can go below.

A durable receiver that acknowledges an object only once its file and its database row
are on disk makes, per object, at least the calls the node's spool and repository make.
This script makes exactly those calls, in the same order, from a tight loop with nothing
else in between, so their median is a floor for the node's time per store (and, with
one association, for the gap to a receiver that does not flush, such as ``storescp``):

    create a temporary file (O_EXCL) -> write the object -> fsync -> rename -> fsync the folder
    -> BEGIN IMMEDIATE; INSERT one row; COMMIT   (SQLite, WAL, synchronous=FULL)

The row is a short one in a table without indexes, so the database part is a lower
bound too; the node also writes an event row and its indexes (``benchmarks.store_path``
times the node's own steps).

    python -m benchmarks.store_floor [--count 1500] [--size 39270] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import machine_facts, write_json

REPO = Path(__file__).resolve().parent.parent


def store_once(folder: str, data: bytes, db: sqlite3.Connection) -> dict[str, float]:
    """One object through the calls of a durable store; seconds per part."""
    name = uuid.uuid4().hex
    temp = os.path.join(folder, f".{name}.dcm.tmp")
    t0 = time.perf_counter()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    t1 = time.perf_counter()
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    os.replace(temp, os.path.join(folder, f"{name}.dcm"))
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    t3 = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO received (name, size) VALUES (?, ?)", (name, len(data)))
    db.execute("COMMIT")
    t4 = time.perf_counter()
    return {"create": t1 - t0, "write_fsync": t2 - t1, "rename_dir_fsync": t3 - t2, "row_commit": t4 - t3,
            "total": t4 - t0}


def run(folder: Path, count: int, size: int, warmup: int = 50) -> dict[str, Any]:
    spool = folder / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / "floor.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS received (id INTEGER PRIMARY KEY, name TEXT, size INTEGER)")
        data = os.urandom(size)
        for _ in range(warmup):
            store_once(str(spool), data, db)
        parts: dict[str, list[float]] = {}
        for i in range(count):
            for key, seconds in store_once(str(spool), data, db).items():
                parts.setdefault(key, []).append(seconds)
            if (i + 1) % 500 == 0:
                print(f"  {i + 1}/{count}", file=sys.stderr, flush=True)
    finally:
        db.close()
    return {key: {"median_ms": 1000 * statistics.median(v), "mean_ms": 1000 * statistics.fmean(v),
                  "p90_ms": 1000 * statistics.quantiles(v, n=10)[-1]} for key, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--size", type=int, default=39270, help="object size in bytes (CT_small.dcm: 39270)")
    ap.add_argument("--dir", type=Path, default=None, help="a folder on the disk to test (default: benchmarks/out)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "store-floor.json")
    args = ap.parse_args(argv)
    base = args.dir or REPO / "benchmarks" / "out"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="store-floor-") as folder:
        parts = run(Path(folder), args.count, args.size)
    result = {"benchmark": "store_floor", "machine": machine_facts(), "count": args.count, "size": args.size,
              "parts": parts}
    for key, p in parts.items():
        print(f"{key:18s} median {p['median_ms']:.3f} ms  mean {p['mean_ms']:.3f} ms  p90 {p['p90_ms']:.3f} ms")
    print(f"a durable store's system calls alone: {parts['total']['median_ms']:.3f} ms per object (median), "
          f"at most {1000 / parts['total']['median_ms']:.0f} objects/s with one association")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
