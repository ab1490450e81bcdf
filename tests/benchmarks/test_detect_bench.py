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


def test_parts_time_every_part_and_count_attention(setup: detect.Setup) -> None:
    row = detect.parts(setup, batch=2, reps=1, target_s=0.01)
    assert set(row["ms_per_batch"]) == {"backbone", "adapted_vit", "noise_encoder", "residuals", "head",
                                        "retrieval", "dski"}
    assert all(v > 0 for v in row["ms_per_batch"].values())
    flops = row["flops_per_image"]
    # the attention is counted: in eval mode its fused kernel is invisible to the counter,
    # which then finds fewer operations than the benchmark reports
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    clip = detect.bare_backbone(setup.model)
    sem, _, _ = detect.inputs(setup, 2)
    with torch.inference_mode(), FlopCounterMode(display=False) as eval_count:
        clip.encode_image(sem)
    assert flops["backbone"] > eval_count.get_total_flops() / 2
    # the adapters add a little to the backbone
    assert flops["backbone"] < flops["adapted_vit"] < 1.2 * flops["backbone"]
    assert flops["noise_encoder"] > 0
    # counting switched modes for a moment only
    assert not setup.model.training and not setup.model.backbone.training


def test_ladder_builds_the_step_up_stage_by_stage(setup: detect.Setup) -> None:
    row = detect.ladder(setup, batch=2, reps=1, target_s=0.01)
    assert list(row["ratio_to_backbone"]) == ["backbone", "adapted_vit", "plus_noise_branch", "plus_head", "dski"]
    assert row["ratio_to_backbone"]["backbone"] == 1.0
    assert all(r > 0 for r in row["ratio_to_backbone"].values())
