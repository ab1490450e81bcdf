"""Smoke test of benchmarks/e2e_latency.py: a real Orthanc, a real `dski serve` with the default
bundle, a 20-image series, one repetition. Asserts the run and the shape of its JSON, not timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import e2e_latency
from tests.peers import require_binary

pytestmark = pytest.mark.e2e


def test_batch_sizes_from_verdict_times() -> None:
    assert e2e_latency.batch_sizes([4.0, 4.0, 4.0, 4.0, 2.5, 2.5, 7.1]) == [4, 2, 1]
    assert e2e_latency.batch_sizes([]) == []


def test_e2e_latency_runs_and_writes_its_result(tmp_path: Path) -> None:
    require_binary("Orthanc")
    require_binary("storescu")
    out = tmp_path / "e2e.json"
    assert e2e_latency.main(["--count", "20", "--reps", "1", "--idle", "1", "--timeout", "180", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["count"] == 20 and result["settings"]["series_idle_seconds"] == 1
    (rep,) = result["reps"]
    assert rep["instances"] == rep["analysed"] == rep["report_instances"] == 20
    assert rep["failed"] == 0
    for key in ("latency_s", "scoring_time_s", "bound_s", "model_seconds", "report_created_rel_s", "report_sent_rel_s"):
        assert isinstance(rep[key], (int, float)), key
    assert rep["latency_s"] > 0 and rep["scoring_time_s"] >= 0
    assert sum(int(k) * n for k, n in rep["batch_size_counts"].items()) == 20
    assert 1 <= rep["mean_batch"] <= result["settings"]["batch_size"]
    assert rep["bound_s"] == pytest.approx(1 + rep["scoring_time_s"] + e2e_latency.SLACK_SECONDS, abs=1e-3)
    assert rep["within_bound"] == (rep["latency_s"] <= rep["bound_s"])
    # the SR cannot reach the PACS before the series has been idle for series_idle_seconds
    assert rep["latency_s"] >= 1.0 - 0.1
    assert result["summary"]["reps"] == 1
    assert len(result["machine"]["loadavg"]) == 3
