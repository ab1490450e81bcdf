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


def test_the_started_pipeline_with_a_decoding_process_scores_every_instance(tmp_path: Path) -> None:
    files = make_ct_instances(tmp_path / "data", 24)
    run = score_pipeline.measure_pipeline(files, BUNDLE, 1, tmp_path / "node", workers=2, decode_processes=1)
    # timed from the first verdict: the instances of the first batch are not counted
    assert 0 < run["images"] < 24 and run["seconds"] > 0
    assert run["model_s"] > 0 and run["claim_s"] > 0 and run["record_s"] > 0


def test_scoring_overrides_leave_out_no_decoding_processes() -> None:
    from benchmarks.common import scoring_overrides
    from listener.config import DetectorConfig

    shipped = DetectorConfig()
    assert scoring_overrides(None, None)["workers"] == shipped.workers
    assert scoring_overrides(3, 0) == {"workers": 3}  # an older checkout's node does not know the key
    assert scoring_overrides(1, 2) == {"workers": 1, "decode_processes": 2}
