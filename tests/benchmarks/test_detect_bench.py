"""Smoke test of benchmarks/detect.py's functions on the shipped default bundle (no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import detect
from detector.cdfa import CDFABlock
from detector.detector import Detector
from detector.preprocess import PreparedImage


@pytest.fixture(scope="module")
def setup() -> detect.Setup:
    return detect.bundle_setup()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bare_backbone_is_an_unadapted_copy(setup: detect.Setup) -> None:
    clip = detect.bare_backbone(setup.model)
    assert not any(isinstance(m, CDFABlock) for m in clip.modules())
    assert any(isinstance(m, CDFABlock) for m in setup.model.modules())  # the model itself untouched
    sem, _, _ = detect.inputs(setup, 2)
    assert detect.backbone_step(clip, sem).shape == (2, setup.model.embed_dim)


def test_dski_step_is_the_detectors_scoring(setup: detect.Setup) -> None:
    """The timed step gives the same fused scores as Detector.frame_scores on the same frames."""
    sem, noise, mod = detect.inputs(setup, 3)
    scores, emb = detect.dski_step(setup.model, setup, sem, noise, mod)
    det = Detector.load(detect.DEFAULT_BUNDLE)
    names = setup.model.spec.head.modalities
    images = [PreparedImage(source=f"random-{i}", modality=names[int(mod[i])], sop_instance_uid=None,
                            frame_indices=(0,), semantic=sem[i:i + 1], noise=noise[i:i + 1]) for i in range(3)]
    fs = det.frame_scores(images)
    np.testing.assert_allclose([f.fused(det.lam)[0] for f in fs], scores, atol=1e-6)
    assert emb.shape == (3, setup.model.embed_dim)


def test_throughput_and_candidates_run(setup: detect.Setup) -> None:
    rows = detect.throughput(setup, [1], reps=1, target_s=0.01)
    assert rows[0]["backbone_img_s"] > 0 and rows[0]["dski_img_s"] > 0 and rows[0]["ratio"] > 0
    prec = detect.precision_candidates(setup, ["bf16", "int8-dynamic", "threads-1"], batch=2, reps=1, target_s=0.01)
    assert [r["candidate"] for r in prec] == ["bf16", "int8-dynamic", "threads-1"]
    assert all("error" not in r and r["speedup"] > 0 for r in prec)
    assert prec[2]["max_score_diff_random"] == 0.0  # the thread count does not change results here
    assert all(r["max_score_diff_random"] < 0.05 for r in prec)


def test_random_bank() -> None:
    bank = detect.random_bank(16, 10)
    assert len(bank) == 10
    assert np.allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, atol=1e-5)
