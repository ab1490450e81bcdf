"""Opt-in reduced precision (``Detector.load(..., precision=...)``): same labels, close scores, fp32 untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.detector import Detector
from detector.precision import PRECISIONS

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "default"


def _frames(det: Detector, n: int = 6):
    from detector.preprocess import PreparedImage

    g = torch.Generator().manual_seed(0)
    s, c = det.preprocess_config.semantic_size, det.preprocess_config.noise_crop
    return [PreparedImage(source=f"r{i}", modality="CT", sop_instance_uid=None, frame_indices=(0,),
                          semantic=torch.randn(1, 3, s, s, generator=g), noise=torch.rand(1, 3, c, c, generator=g))
            for i in range(n)]


def test_fp32_is_the_default_and_unchanged() -> None:
    det = Detector.load(BUNDLE)
    assert det.precision == "fp32"
    assert det.model.backbone.visual.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "fp32"])
def test_reduced_precision_scores_close_to_fp32(precision: str) -> None:
    ref = Detector.load(BUNDLE)
    det = Detector.load(BUNDLE, precision=precision)
    assert det.precision == precision
    frames = _frames(ref)
    a = np.array([v.score for v in ref.score_prepared(frames)])
    b = np.array([v.score for v in det.score_prepared(frames)])
    assert np.max(np.abs(a - b)) < 0.03
    if precision == "bf16":  # the noise branch and head stay fp32
        assert det.model.backbone.visual.conv1.weight.dtype == torch.bfloat16
        assert det.model.noise_encoder.embed.weight.dtype == torch.float32


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        Detector.load(BUNDLE, precision="fp8")
