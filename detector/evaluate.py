"""Evaluate a bundle on a labelled data set, with and without the retrieval stage (MFRM).

The report holds, for the bundle's λ ("with_mfrm") and for λ = 0
("without_mfrm"), the metrics of ``detector.metrics.grouped_metrics`` at the
bundle's fixed thresholds: ``threshold`` for the fused score and
``classifier_threshold`` for the classifier alone, each chosen on validation
data at training time for that score (older bundles without one use
``threshold`` for both). Files that cannot be prepared are listed under
``errors`` with their reason and left out of the metrics: never scored silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detector.dataset import Sample, discover, summarise
from detector.detector import Detector, FrameScores
from detector.errors import PreprocessError
from detector.metrics import ScoredSample, grouped_metrics
from detector.preprocess import PreparedImage, prepare_file

logger = logging.getLogger(__name__)

CHUNK = 64  # images prepared and scored at a time: bounds memory on large sets


def score_samples(detector: Detector, samples: Sequence[Sample],
                  progress: Callable[[int], None] | None = None
                  ) -> tuple[list[tuple[Sample, FrameScores]], list[dict[str, str]]]:
    """Per-frame scores of every sample that prepares; ``errors`` lists the others (path, reason)."""
    scored: list[tuple[Sample, FrameScores]] = []
    errors: list[dict[str, str]] = []
    cfg = detector.preprocess_config
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start:start + CHUNK]
        ok: list[tuple[Sample, PreparedImage]] = []
        for s in chunk:
            try:
                ok.append((s, prepare_file(s.path, cfg, modality=s.modality)))
            except PreprocessError as exc:
                logger.warning("cannot evaluate image", extra={"source": exc.source, "reason": exc.reason})
                errors.append({"path": str(s.path), "error": exc.reason})
        frames = detector.frame_scores([img for _, img in ok])
        scored.extend((s, f) for (s, _), f in zip(ok, frames))
        if progress is not None:
            progress(len(chunk))
    return scored, errors


def scored_samples(scored: Sequence[tuple[Sample, FrameScores]], lam: float) -> list[ScoredSample]:
    return [ScoredSample(s.label, s.modality, s.generator, f.image_score(lam)[0]) for s, f in scored]


def evaluate_detector(detector: Detector, samples: Sequence[Sample], *, plots_dir: Path | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    scored, errors = score_samples(detector, samples, progress)
    with_mfrm = scored_samples(scored, detector.lam)
    without = scored_samples(scored, 0.0)
    threshold, cls_threshold = detector.threshold, detector.classifier_threshold
    report: dict[str, Any] = {
        "bundle": {
            "path": str(detector.bundle.path),
            "name": detector.name,
            "version": detector.version,
            "model_version": detector.model_version,
            "method": detector.bundle.manifest.method,
        },
        "threshold": threshold,
        "classifier_threshold": cls_threshold,
        "retrieval": {**detector.bundle.manifest.retrieval.model_dump(), "bank_size": len(detector.bank)},
        "data": summarise(samples),
        "n_scored": len(scored),
        "errors": errors,
        "with_mfrm": grouped_metrics(with_mfrm, threshold),
        "without_mfrm": grouped_metrics(without, cls_threshold),
    }
    if plots_dir is not None and scored:
        from detector.plots import evaluation_plots

        report["plots"] = [str(p) for p in evaluation_plots(with_mfrm, without, threshold, plots_dir)]
    return report


def evaluate(bundle: Path | str | Detector, data: Path | str, *, json_out: Path | None = None,
             plots_dir: Path | None = None, batch_size: int = 16, device: str = "cpu",
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate ``bundle`` on the data set folder or CSV manifest ``data``; optionally write JSON and plots."""
    detector = (bundle if isinstance(bundle, Detector)
                else Detector.load(bundle, device=device, batch_size=batch_size))
    samples = discover(data)
    report = evaluate_detector(detector, samples, plots_dir=plots_dir, progress=progress)
    report["data"]["path"] = str(data)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
