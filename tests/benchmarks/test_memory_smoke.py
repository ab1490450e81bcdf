"""Smoke test of benchmarks/memory.py: `dski serve` with the default bundle, 60 instances in chunks,
a real Orthanc. Asserts that the script ran and wrote a well-formed result, not any memory figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import memory
from tests.peers import require_binary

pytestmark = pytest.mark.e2e


def test_proc_status_reads_this_process() -> None:
    import os

    mem = memory.proc_status(os.getpid())
    assert 0 < mem["VmRSS"] <= mem["VmHWM"]


def test_memory_runs_and_writes_its_result(tmp_path: Path) -> None:
    require_binary("Orthanc")
    require_binary("storescu")
    out = tmp_path / "memory.json"
    argv = ["--bundle", "default", "--count", "60", "--at", "20", "--chunk", "20", "--backlog", "40",
            "--idle", "1", "--sample-every", "0.25", "--timeout", "300", "--out", str(out)]
    assert memory.main(argv) == 0
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["instances"] == 60 and s["failed"] == 0
    assert s["rss_at_20_bytes"] > 0 and s["rss_at_60_bytes"] > 0 and s["peak_bytes"] >= s["rss_at_60_bytes"]
    assert s["done_at_20_sample"] >= 20 and s["done_at_60_sample"] == 60
    assert isinstance(s["growth"], float) and isinstance(s["peak_within_bound"], bool)
    assert result["reports_sent"] == 1
    assert result["samples"] and all({"t", "done", "rss", "hwm", "load1"} <= set(x) for x in result["samples"])
