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


def test_default_bundle_carries_its_calibration_set() -> None:
    """``dski bank add`` on the shipped bundle re-chooses λ on its validation images (detector.calibration)."""
    import json

    from detector.calibration import load_calibration

    bundle = ROOT / "bundles" / "default"
    cal = load_calibration(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    counts = manifest["training"]["validation"]["counts"]
    assert cal is not None and len(cal) == sum(sum(per.values()) for per in counts.values())
    assert (cal.bank_ids == -1).all() and cal.embeddings.shape[1] == manifest["embedding_dim"]
