"""benchmarks/score_pipeline.py scores every instance through the worker and writes its result
(no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import score_pipeline
from benchmarks.common import make_ct_instances

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "default"


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    pass


def test_the_worker_scores_every_instance(tmp_path: Path) -> None:
    files = make_ct_instances(tmp_path / "data", 20)
    run = score_pipeline.measure_pipeline(files, BUNDLE, 1, tmp_path / "node")
    # the first batch of 8 warms up and is not counted; the run checks that all 20 were analysed
    assert run["images"] == 12 and run["seconds"] > 0
    assert 0 < run["model_s"] < run["seconds"] and run["claim_s"] > 0 and run["record_s"] > 0


def test_main_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "score.json"
    assert score_pipeline.main(["--count", "16", "--reps", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["kind"] for r in result["runs"]} == {"pipeline", "model"}
    assert result["summary"]["pipeline_median_per_s"] > 0 and result["summary"]["model_median_per_s"] > 0
