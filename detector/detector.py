"""Scoring with a loaded bundle: ``Detector`` and its ``Verdict``.

Every sampled frame of every image goes through the model in batches of
``batch_size`` frames; each frame gets a classifier probability and, when the
bank is not empty, a retrieval probability from its k nearest support images;
the two are fused with the bundle's λ. An image's score is the maximum fused
probability over its frames (one manipulated frame is enough to flag the
image); ``classifier_score`` and ``retrieval_score`` are those of that frame.

Thread safety: the node's worker threads share one ``Detector``. Scoring only
reads the model (eval mode, ``torch.inference_mode``, text embeddings cached at
load); the CDFA noise tokens travel in a thread-local slot, and the bank builds
its faiss index and digest once under a lock. Concurrent calls therefore give
the same verdicts as sequential ones (tested). Changing the bank while other
threads score is not supported.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset

from detector.bundle import LoadedBundle, load_bundle
from detector.errors import PreprocessError
from detector.precision import PRECISIONS, apply_precision
from detector.preprocess import PreparedImage, PreprocessConfig, prepare_dataset, prepare_file
from detector.retrieval import SupportBank, fuse

DEFAULT_BATCH_SIZE = 16
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; a clear ``ValueError`` when it cannot be used."""
    if isinstance(name, torch.device):
        name = str(name)
    if not _DEVICE.match(name):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


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
    model_version: str        # "<bundle_name>@<bundle_version>+w<weights sha256[:12]>.b<bank digest[:8]>"
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


@dataclass(frozen=True)
class FileVerdict:
    """Outcome of one file of ``Detector.score_files``: a verdict, or the error that stopped it."""

    path: str
    verdict: Verdict | None
    error: PreprocessError | None
    sop_instance_uid: str | None = None
    modality: str | None = None


class Detector:
    """A loaded bundle ready to score images; safe to share between threads for scoring (module docstring)."""

    def __init__(self, bundle: LoadedBundle, *, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.bundle = bundle
        self.device = resolve_device(device)
        # Parameters and buffers (the cached text embeddings too) live on the device; the faiss
        # bank stays on the CPU, embeddings come back to it for retrieval.
        self.model = bundle.model.to(self.device)
        self.batch_size = batch_size
        self.precision = "fp32"

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu",
             batch_size: int = DEFAULT_BATCH_SIZE, precision: str = "fp32") -> Detector:
        """Load a bundle; ``precision`` "bf16" or "int8-dynamic" opts into ``detector.precision``."""
        device = resolve_device(device)  # fail before the (slow) load
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        bundle = load_bundle(path, device=device)
        apply_precision(bundle.model, precision)
        detector = cls(bundle, device=device, batch_size=batch_size)
        detector.precision = precision
        return detector

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
    def classifier_threshold(self) -> float:
        """Threshold for the classifier score alone (λ = 0); the fused one for bundles that lack it."""
        t = self.bundle.manifest.classifier_threshold
        return self.threshold if t is None else t

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
        # An explicit λ = 0 asks for the classifier alone, which has its own threshold.
        threshold = self.classifier_threshold if lam == 0.0 else self.threshold
        lam = self.lam if lam is None else lam
        score, i = fs.image_score(lam)
        score = min(max(score, 0.0), 1.0)
        return Verdict(
            score=score,
            label="fake" if score >= threshold else "real",
            threshold=threshold,
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

    def score_files(self, paths: Sequence[Path | str], modality: str | None = None) -> list[FileVerdict]:
        """Score many files with batched forward passes; one ``FileVerdict`` per path, in order.

        A file whose pixel data cannot be used gets its ``PreprocessError`` instead of a
        verdict; the others are still scored. ``elapsed_ms`` is the file's own preparation
        time plus its share (by frames) of its chunk's forward time. Files are prepared
        ``batch_size`` at a time, which bounds memory.
        """
        out: list[FileVerdict] = []
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start:start + self.batch_size]
            results: list[FileVerdict | None] = []
            ok: list[tuple[int, PreparedImage, float]] = []
            for path in chunk:
                t0 = time.perf_counter()
                try:
                    image = prepare_file(path, self.preprocess_config, modality=modality)
                except PreprocessError as exc:
                    results.append(FileVerdict(str(path), None, exc))
                    continue
                ok.append((len(results), image, (time.perf_counter() - t0) * 1000.0))
                results.append(None)
            t0 = time.perf_counter()
            scores = self.frame_scores([image for _, image, _ in ok])
            forward_ms = (time.perf_counter() - t0) * 1000.0
            frames = sum(int(f.classifier.shape[0]) for f in scores) or 1
            for (i, image, prep_ms), fs in zip(ok, scores):
                share = forward_ms * fs.classifier.shape[0] / frames
                results[i] = FileVerdict(str(chunk[i]), self._verdict(fs, prep_ms + share), None,
                                         image.sop_instance_uid, image.modality)
            out.extend(r for r in results if r is not None)
        return out

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
