"""Detection metrics in the field's protocol: per modality and per generator.

Each generator is scored against the real images of its own modality: real
accuracy, fake accuracy and accuracy at the fixed threshold, average precision
and ROC AUC (fake is the positive class). AUC and AP are undefined when only one
class is present; they are then ``None`` rather than a misleading number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


@dataclass(frozen=True)
class ScoredSample:
    label: int          # 1 fake, 0 real
    modality: str
    generator: str      # "real" for real images
    score: float


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def binary_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                   threshold: float) -> dict[str, float | int | None]:
    """real_acc, fake_acc, acc, balanced_acc at ``threshold`` (score >= threshold is fake), AP, AUC."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    pred = s >= threshold
    real, fake = y == 0, y == 1
    n_real, n_fake = int(real.sum()), int(fake.sum())
    real_acc = float((~pred[real]).mean()) if n_real else None
    fake_acc = float(pred[fake].mean()) if n_fake else None
    acc = float((pred == (y == 1)).mean()) if len(y) else None
    both = n_real > 0 and n_fake > 0
    return {
        "n_real": n_real,
        "n_fake": n_fake,
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "acc": acc,
        "balanced_acc": (real_acc + fake_acc) / 2 if both else None,
        "ap": _finite(average_precision_score(y, s)) if both else None,
        "auc": _finite(roc_auc_score(y, s)) if both else None,
    }


def grouped_metrics(samples: Sequence[ScoredSample], threshold: float) -> dict[str, object]:
    """``overall``, ``per_modality`` and ``per_generator`` ("<modality>/<generator>" vs that modality's reals)."""
    def metrics_of(group: Sequence[ScoredSample]) -> dict[str, float | int | None]:
        return binary_metrics([g.label for g in group], [g.score for g in group], threshold)

    modalities = sorted({s.modality for s in samples})
    per_modality = {m: metrics_of([s for s in samples if s.modality == m]) for m in modalities}
    per_generator: dict[str, dict[str, float | int | None]] = {}
    for m in modalities:
        reals = [s for s in samples if s.modality == m and s.label == 0]
        for g in sorted({s.generator for s in samples if s.modality == m and s.label == 1}):
            fakes = [s for s in samples if s.modality == m and s.label == 1 and s.generator == g]
            per_generator[f"{m}/{g}"] = metrics_of(reals + fakes)
    return {"overall": metrics_of(samples), "per_modality": per_modality, "per_generator": per_generator}


def best_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Threshold that maximises balanced accuracy (ties: the one closest to 0.5).

    Candidates are the midpoints between consecutive distinct scores, so the
    threshold generalises better than one sitting exactly on a sample. With a
    single class present there is nothing to separate: 0.5.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        return 0.5
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    bal = (tpr + 1.0 - fpr) / 2.0
    uniq = np.unique(s)
    # roc_curve's thresholds are the scores themselves (plus +inf); move each to the
    # midpoint with the next lower distinct score, which classifies the same way.
    candidates = []
    for t in thr:
        if not np.isfinite(t):
            candidates.append(float(uniq[-1]) + 1e-6)
            continue
        lower = uniq[uniq < t]
        candidates.append(float((t + lower[-1]) / 2.0) if len(lower) else float(t) - 1e-6)
    candidates_arr = np.clip(np.asarray(candidates), 0.0, 1.0)
    best = bal.max()
    idx = np.flatnonzero(np.isclose(bal, best))
    return float(candidates_arr[idx[np.argmin(np.abs(candidates_arr[idx] - 0.5))]])
