"""Re-choosing the MFRM fusion weight λ and the decision threshold when the bank changes.

A bank edit (``dski bank add``) is how an operator teaches the detector a generator
it was not trained on: a handful of that generator's fakes. Retrieval then knows
something the classifier does not, and the weight that training gave the two
(``RetrievalSettings.lam``) is no longer the right one. It is re-chosen here, on
held-out evidence only, never on the data the bundle will be judged on:

* the **calibration set**: the validation images of training (classifier score and
  embedding of each; they are not in the bank), saved in the bundle by ``dski train``;
* the **support images** themselves, each scored when it is added, and retrieved
  leaving its own bank entry out (leave-one-out), so an image never votes for itself.

For every λ of a fixed grid the fused score ``(1 - λ) p_cls + λ p_ret`` of those
images is ranked, and the λ with the best mean per-modality AUC wins; on a tie the λ
nearest to the current one (so a bank edit that adds no information changes nothing).
The threshold is then the one of maximum balanced accuracy at that λ, as in training.

The set is stored in ``BUNDLE/calibration.npz`` (numpy, no pickles). A bundle written
before this existed has none: bank edits then keep λ and the threshold as they are.
An image is represented as the bank represents it: its mean frame embedding, and the
maximum of its frames' classifier scores.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from detector.errors import BundleError
from detector.metrics import best_threshold
from detector.retrieval import (
    SupportBank,
    current_umask,
    fuse,
    l2_normalise,
    retrieval_probability,
)

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.npz"
LAMBDA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
# Two λ whose AUCs differ by less than this are a tie: the difference is rounding noise.
_AUC_TIE = 1e-9


@dataclass(frozen=True)
class CalibrationSet:
    """Held-out images as the fusion sees them; ``bank_ids[i]`` is image i's own bank entry, or -1."""

    classifier: np.ndarray            # (N,) float64 classifier probability of fake
    embeddings: np.ndarray            # (N, D) float32, L2-normalised
    labels: np.ndarray                # (N,) int8, 1 = fake
    modalities: tuple[str, ...]
    generators: tuple[str, ...]
    bank_ids: np.ndarray              # (N,) int64

    def __post_init__(self) -> None:
        n = self.classifier.shape[0]
        if self.classifier.ndim != 1:
            raise ValueError(f"classifier scores must be (N,), got {self.classifier.shape}")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise ValueError(f"embeddings must be ({n}, D), got {self.embeddings.shape}")
        for name, size in (("labels", self.labels.shape[0]), ("modalities", len(self.modalities)),
                           ("generators", len(self.generators)), ("bank_ids", self.bank_ids.shape[0])):
            if size != n:
                raise ValueError(f"calibration set has {n} scores but {size} {name}")
        if not (np.isfinite(self.classifier).all() and np.isfinite(self.embeddings).all()):
            raise ValueError("calibration scores or embeddings contain NaN or infinity")

    @classmethod
    def build(cls, classifier: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, modalities: list[str],
              generators: list[str], bank_ids: np.ndarray | None = None) -> CalibrationSet:
        n = len(modalities)
        return cls(
            classifier=np.asarray(classifier, dtype=np.float64),
            embeddings=l2_normalise(np.atleast_2d(np.asarray(embeddings, dtype=np.float32))),
            labels=np.asarray(labels, dtype=np.int8),
            modalities=tuple(modalities),
            generators=tuple(generators),
            bank_ids=np.full(n, -1, np.int64) if bank_ids is None else np.asarray(bank_ids, np.int64),
        )

    @classmethod
    def from_frame_scores(cls, frames: list[tuple[np.ndarray, np.ndarray]], labels: list[int], modalities: list[str],
                          generators: list[str], bank_ids: list[int] | None = None) -> CalibrationSet:
        """From each image's per-frame (classifier (F,), embeddings (F, D)), as the bank sees images."""
        if not frames:
            raise ValueError("a calibration set needs at least one image")
        return cls.build(
            classifier=np.array([float(np.max(c)) for c, _ in frames]),
            embeddings=np.stack([np.asarray(e, dtype=np.float32).mean(axis=0) for _, e in frames]),
            labels=np.array(labels), modalities=modalities, generators=generators,
            bank_ids=None if bank_ids is None else np.array(bank_ids),
        )

    def __len__(self) -> int:
        return int(self.classifier.shape[0])

    def extend(self, other: CalibrationSet) -> CalibrationSet:
        if len(self) and other.embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embedding dimension {other.embeddings.shape[1]} != {self.embeddings.shape[1]}")
        return CalibrationSet(
            classifier=np.concatenate([self.classifier, other.classifier]),
            embeddings=np.concatenate([self.embeddings, other.embeddings]),
            labels=np.concatenate([self.labels, other.labels]),
            modalities=self.modalities + other.modalities,
            generators=self.generators + other.generators,
            bank_ids=np.concatenate([self.bank_ids, other.bank_ids]),
        )

    def without_bank_ids(self, removed: set[int]) -> CalibrationSet:
        """Drop the support images whose bank entries were removed (validation images stay)."""
        keep = np.array([int(b) < 0 or int(b) not in removed for b in self.bank_ids], dtype=bool)
        return CalibrationSet(
            classifier=self.classifier[keep], embeddings=self.embeddings[keep], labels=self.labels[keep],
            modalities=tuple(m for m, k in zip(self.modalities, keep) if k),
            generators=tuple(g for g, k in zip(self.generators, keep) if k),
            bank_ids=self.bank_ids[keep],
        )


def save_calibration(bundle: Path | str, cal: CalibrationSet) -> Path:
    """Write ``BUNDLE/calibration.npz`` atomically."""
    path = Path(bundle) / CALIBRATION_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calibration-", suffix=".npz")
    try:
        # mkstemp makes the file private (0600); a bundle must be readable like its other files
        # (the node may run as another user than the one who trained or amended the bundle).
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, classifier=cal.classifier, embeddings=cal.embeddings, labels=cal.labels,
                     modalities=np.array(cal.modalities, dtype=str), generators=np.array(cal.generators, dtype=str),
                     bank_ids=cal.bank_ids)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_calibration(bundle: Path | str) -> CalibrationSet | None:
    """The bundle's calibration set, or None when it has none (an older bundle)."""
    path = Path(bundle) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return CalibrationSet(
                classifier=z["classifier"].astype(np.float64), embeddings=z["embeddings"].astype(np.float32),
                labels=z["labels"].astype(np.int8), modalities=tuple(str(m) for m in z["modalities"]),
                generators=tuple(str(g) for g in z["generators"]), bank_ids=z["bank_ids"].astype(np.int64),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(path, f"cannot read calibration set: {exc}") from exc


def leave_one_out_retrieval(bank: SupportBank, cal: CalibrationSet, k: int, temperature: float) -> np.ndarray | None:
    """Retrieval probability of every calibration image, its own bank entry (if any) left out."""
    if len(bank) == 0 or len(cal) == 0:
        return None
    sims, idx = bank.query(cal.embeddings, k + 1)
    ids = np.array([e.id for e in bank.entries], dtype=np.int64)
    labels = bank.labels
    out = np.empty(len(cal), dtype=np.float64)
    for i in range(len(cal)):
        hits = [(s, j) for s, j in zip(sims[i], idx[i]) if j >= 0 and ids[j] != cal.bank_ids[i]][:k]
        if not hits:  # the bank held only this image: no neighbour can speak for it
            out[i] = 0.5
            continue
        s = np.array([[h[0] for h in hits]], dtype=np.float32)
        lab = np.array([[labels[h[1]] for h in hits]])
        out[i] = float(retrieval_probability(s, lab, temperature)[0])
    return out


def mean_modality_auc(labels: np.ndarray, scores: np.ndarray, modalities: tuple[str, ...]) -> float | None:
    """Mean over modalities (with both classes present) of the AUC within the modality."""
    mods = np.array(modalities)
    aucs = []
    for m in sorted(set(modalities)):
        sel = mods == m
        y = labels[sel]
        if 0 < int(y.sum()) < int(sel.sum()):
            aucs.append(float(roc_auc_score(y, scores[sel])))
    return float(np.mean(aucs)) if aucs else None


@dataclass(frozen=True)
class FusionChoice:
    """The outcome of ``choose_fusion``; ``changed`` is False when λ and threshold stay."""

    lam: float
    threshold: float
    previous_lam: float
    previous_threshold: float
    auc: float | None                       # mean per-modality AUC at ``lam`` on the calibration images
    auc_by_lambda: dict[str, float | None] = field(default_factory=dict)
    n_real: int = 0
    n_fake: int = 0
    n_support: int = 0
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.lam != self.previous_lam or self.threshold != self.previous_threshold

    def summary(self) -> dict[str, object]:
        return {"lam": self.lam, "threshold": self.threshold, "previous_lam": self.previous_lam,
                "previous_threshold": self.previous_threshold, "auc": self.auc, "n_real": self.n_real,
                "n_fake": self.n_fake, "n_support": self.n_support, "reason": self.reason}


def choose_fusion(bank: SupportBank, cal: CalibrationSet, *, k: int, temperature: float, lam: float,
                  threshold: float, grid: tuple[float, ...] = LAMBDA_GRID) -> FusionChoice:
    """Pick λ (best mean per-modality AUC, ties to the nearest of ``lam``) and its threshold."""
    n_fake = int(cal.labels.sum())
    n_real = len(cal) - n_fake
    n_support = int((cal.bank_ids >= 0).sum())
    keep = FusionChoice(lam=lam, threshold=threshold, previous_lam=lam, previous_threshold=threshold, auc=None,
                        n_real=n_real, n_fake=n_fake, n_support=n_support)
    if n_fake == 0 or n_real == 0:
        return replace(keep, reason="calibration set lacks real or fake images")
    p_ret = leave_one_out_retrieval(bank, cal, k, temperature)
    if p_ret is None:
        return replace(keep, reason="empty bank")
    by_lambda: dict[str, float | None] = {}
    best: tuple[float, float] | None = None  # (auc, λ)
    for g in sorted(set(grid) | {lam}):
        auc = mean_modality_auc(cal.labels, np.asarray(fuse(cal.classifier, p_ret, g)), cal.modalities)
        by_lambda[f"{g:.2f}"] = auc
        if auc is None:
            continue
        if best is None or auc > best[0] + _AUC_TIE or (abs(auc - best[0]) <= _AUC_TIE
                                                          and abs(g - lam) < abs(best[1] - lam)):
            best = (auc, g)
    if best is None:
        return replace(keep, auc_by_lambda=by_lambda,
                       reason="no modality has both real and fake calibration images")
    auc, chosen = best
    if chosen == lam:
        new_threshold = threshold  # nothing learnt: keep training's threshold
    else:
        new_threshold = best_threshold(cal.labels, np.asarray(fuse(cal.classifier, p_ret, chosen)))
    return FusionChoice(lam=chosen, threshold=float(new_threshold), previous_lam=lam, previous_threshold=threshold,
                        auc=auc, auc_by_lambda=by_lambda, n_real=n_real, n_fake=n_fake, n_support=n_support,
                        reason="best mean per-modality AUC on the calibration and support images")
