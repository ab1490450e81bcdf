"""benchmarks/store_floor.py runs and leaves the objects and rows it claims to have made (no timing asserted)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from benchmarks import store_floor


def test_store_floor_makes_the_durable_calls(tmp_path: Path) -> None:
    parts = store_floor.run(tmp_path, count=12, size=1000, warmup=3)
    assert set(parts) == {"create", "write_fsync", "rename_dir_fsync", "row_commit", "total"}
    assert all(p["median_ms"] > 0 for p in parts.values())
    files = list((tmp_path / "spool").iterdir())
    assert len(files) == 15 and all(f.suffix == ".dcm" and f.stat().st_size == 1000 for f in files)
    with sqlite3.connect(tmp_path / "floor.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM received").fetchone()[0] == 15
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_main_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    assert store_floor.main(["--count", "5", "--size", "500", "--dir", str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file() and not list(tmp_path.glob("store-floor-*"))  # its work folder is removed
