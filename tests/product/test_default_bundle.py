"""The bundle the shipped config.yaml names loads from the repository and scores DICOM offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from detector.detector import Detector
from listener.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def detector() -> Detector:
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.detector.bundle == (ROOT / "bundles" / "default").resolve()
    return Detector.load(cfg.detector.bundle)


def test_default_bundle_scores_a_dicom_file(detector: Detector) -> None:
    verdict = detector.score_file(get_testdata_file("CT_small.dcm"))
    assert 0.0 <= verdict.score <= 1.0
    assert verdict.label in {"real", "fake"}
    assert verdict.bundle_name == "dski-default"
    assert verdict.model_version.startswith("dski-default@")


def test_default_bundle_manifest_states_its_limits(detector: Detector) -> None:
    import json

    manifest = json.loads((ROOT / "bundles" / "default" / "manifest.json").read_text())
    assert "not clinically validated" in manifest["clinical_use"]
    assert manifest["training"]["backbone"] == "dski-tiny"
