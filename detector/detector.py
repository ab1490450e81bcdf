"""Scoring with a loaded bundle: ``Detector`` and its ``Verdict``.

Every sampled frame of every image goes through the model in batches of
``batch_size`` frames; each frame gets a classifier probability and, when the
bank is not empty, a retrieval probability from its k nearest support images;
the two are fused with the bundle's λ. An image's score is the maximum fused
probability over its frames (one manipulated frame is enough to flag the
image); ``classifier_score`` and ``retrieval_score`` are those of that frame.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset

from detector.bundle import LoadedBundle, load_bundle
from detector.preprocess import PreparedImage, PreprocessConfig, prepare_dataset, prepare_file
from detector.retrieval import SupportBank, fuse

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Verdict:
    score: float              # fused probability of "AI-generated", in [0, 1]
    label: str                # "fake" if score >= threshold else "real"
    threshold: float
    classifier_score: float   # head probability before retrieval fusion
    retrieval_score: float | None
    frames_scored: int
    bundle_name: str
    bundle_version: str       # semantic version from the manifest
    model_version: str        # "<bundle_name>@<bundle_version>+<weights sha256[:12]>"
    elapsed_ms: float


@dataclass(frozen=True)
class FrameScores:
    """Per-frame outputs of one image, before the max over frames."""

    classifier: np.ndarray          # (F,) head probability of fake
    retrieval: np.ndarray | None    # (F,) retrieval probability of fake, None for an empty bank
    embeddings: np.ndarray          # (F, D) L2-normalised

    def fused(self, lam: float) -> np.ndarray:
        return np.asarray(fuse(self.classifier, self.retrieval, lam), dtype=np.float64)

    def image_score(self, lam: float) -> tuple[float, int]:
        """(max fused probability over frames, index of that frame)."""
        f = self.fused(lam)
        i = int(np.argmax(f))
        return float(f[i]), i


class Detector:
    """A loaded bundle ready to score images; thread-compatible for read-only scoring of one call at a time."""

    def __init__(self, bundle: LoadedBundle, *, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.bundle = bundle
        self.model = bundle.model
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE) -> Detector:
        return cls(load_bundle(path, device=device), device=device, batch_size=batch_size)

    # ----------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def threshold(self) -> float:
        return self.bundle.manifest.threshold

    @property
    def lam(self) -> float:
        return self.bundle.manifest.retrieval.lam

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.bundle.preprocess

    @property
    def bank(self) -> SupportBank:
        return self.bundle.bank

    # ----------------------------------------------------------------- scoring
    def frame_scores(self, images: Sequence[PreparedImage]) -> list[FrameScores]:
        """Classifier and retrieval probabilities and embeddings of every frame, in batches."""
        if not images:
            return []
        counts = [int(img.semantic.shape[0]) for img in images]
        semantic = torch.cat([img.semantic for img in images])
        noise = torch.cat([img.noise for img in images])
        modality = torch.cat([torch.full((n,), self.model.modality_index(img.modality), dtype=torch.long)
                              for img, n in zip(images, counts)])
        probs, embs = [], []
        with torch.inference_mode():
            for start in range(0, semantic.shape[0], self.batch_size):
                sl = slice(start, start + self.batch_size)
                emb, logits = self.model.embed_and_logits(
                    semantic[sl].to(self.device), noise[sl].to(self.device), modality[sl].to(self.device))
                probs.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu().double().numpy())
                embs.append(emb.float().cpu().numpy())
        p_cls = np.concatenate(probs)
        emb_all = np.concatenate(embs).astype(np.float32)
        r = self.bundle.manifest.retrieval
        p_ret = self.bank.fake_probability(emb_all, r.k, r.temperature)
        out, start = [], 0
        for n in counts:
            sl = slice(start, start + n)
            out.append(FrameScores(p_cls[sl], None if p_ret is None else p_ret[sl], emb_all[sl]))
            start += n
        return out

    def _verdict(self, fs: FrameScores, elapsed_ms: float, lam: float | None = None) -> Verdict:
        lam = self.lam if lam is None else lam
        score, i = fs.image_score(lam)
        score = min(max(score, 0.0), 1.0)
        return Verdict(
            score=score,
            label="fake" if score >= self.threshold else "real",
            threshold=self.threshold,
            classifier_score=float(fs.classifier[i]),
            retrieval_score=None if fs.retrieval is None else float(fs.retrieval[i]),
            frames_scored=int(fs.classifier.shape[0]),
            bundle_name=self.name,
            bundle_version=self.version,
            model_version=self.model_version,
            elapsed_ms=elapsed_ms,
        )

    def score_prepared(self, images: Sequence[PreparedImage], *, lam: float | None = None) -> list[Verdict]:
        """Verdicts of prepared images; ``elapsed_ms`` is each image's share (by frames) of the batch time.

        ``lam`` overrides the bundle's fusion weight (0: classifier only).
        """
        t0 = time.perf_counter()
        scores = self.frame_scores(images)
        total_ms = (time.perf_counter() - t0) * 1000.0
        frames = sum(int(f.classifier.shape[0]) for f in scores) or 1
        return [self._verdict(f, total_ms * f.classifier.shape[0] / frames, lam) for f in scores]

    def score_file(self, path: Path | str, modality: str | None = None) -> Verdict:
        """Prepare and score one file; ``elapsed_ms`` includes reading and preprocessing.

        Raises ``PreprocessError`` when the pixel data cannot be used.
        """
        t0 = time.perf_counter()
        image = prepare_file(path, self.preprocess_config, modality=modality)
        fs = self.frame_scores([image])[0]
        return self._verdict(fs, (time.perf_counter() - t0) * 1000.0)

    def score_dataset(self, ds: Dataset, source: str | None = None) -> Verdict:
        """Score a decoded DICOM dataset (as received over C-STORE)."""
        t0 = time.perf_counter()
        image = prepare_dataset(ds, self.preprocess_config, source)
        fs = self.frame_scores([image])[0]
        return self._verdict(fs, (time.perf_counter() - t0) * 1000.0)

    def embed_prepared(self, images: Sequence[PreparedImage]) -> np.ndarray:
        """(N, D) one L2-normalised embedding per image (mean of its frames, renormalised): bank entries."""
        embs = [f.embeddings.mean(axis=0) for f in self.frame_scores(images)]
        if not embs:
            return np.zeros((0, self.bundle.manifest.embedding_dim), np.float32)
        e = np.stack(embs).astype(np.float32)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
