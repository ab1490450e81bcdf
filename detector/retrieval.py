"""MFRM, the medical forensic retrieval module: a labelled support bank searched with faiss.

The bank holds L2-normalised float32 embeddings of support images (the model's
adapted embedding, ``ForensicModel.embed``) with one ``SupportEntry`` each. At
test time the top-k neighbours of an image give a similarity-weighted fake
probability that is fused with the classifier probability by a weight λ.

Index choice: an exact ``IndexFlatIP`` up to ``EXACT_INDEX_MAX_SIZE`` entries (a
brute-force search over 50 000 x 768 floats takes a few milliseconds per query on
CPU), an approximate ``IndexHNSWFlat`` with inner-product metric above it. Because
the vectors are normalised, inner product equals cosine similarity.

On disk a bank is a folder with ``embeddings.npy`` (N, D) float32 and
``entries.json`` (format version, dimension, entries with their stable ids).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

EXACT_INDEX_MAX_SIZE = 50_000
"""Banks with more entries than this are searched with HNSW instead of an exact flat index."""

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH_MIN = 64

BANK_FORMAT_VERSION = 1
BANK_DIGEST_DOMAIN = b"dski-bank-digest/1\n"
EMBEDDINGS_FILE = "embeddings.npy"
ENTRIES_FILE = "entries.json"

Label = Literal["real", "fake"]
LABELS: tuple[str, ...] = ("real", "fake")


class BankFormatError(ValueError):
    """A bank folder that cannot be read; ``detector.bundle`` turns it into a ``BundleError``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class SupportEntry:
    label: Label
    modality: str
    generator: str          # "real" for real images, else the generator's name
    source: str             # file path or other description of where the image came from
    id: int = -1            # stable id assigned by the bank; -1 before insertion

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"support entry label must be 'real' or 'fake', got {self.label!r}")

    @property
    def is_fake(self) -> bool:
        return self.label == "fake"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def retrieval_probability(sims: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(sims / T)-weighted fraction of fake neighbours, per row.

    ``sims`` (B, k) similarities of the neighbours, ``labels`` (B, k) 1 for fake and
    0 for real. A small temperature approaches the label of the nearest neighbour, a
    large one the plain fraction of fakes among the k.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if sims.shape != labels.shape or sims.ndim != 2:
        raise ValueError(f"sims {sims.shape} and labels {labels.shape} must both be (B, k)")
    if sims.shape[1] == 0:
        raise ValueError("retrieval probability needs at least one neighbour")
    z = sims / temperature
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    w /= w.sum(axis=1, keepdims=True)
    return (w * labels).sum(axis=1)


def fuse(p_cls: np.ndarray | float, p_ret: np.ndarray | float | None, lam: float) -> np.ndarray | float:
    """``(1 - lam) * p_cls + lam * p_ret``; the classifier score alone when there is no retrieval score."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    if p_ret is None or lam == 0.0:
        return p_cls
    if np.ndim(p_cls) == 0 and np.ndim(p_ret) == 0:
        return (1.0 - lam) * float(p_cls) + lam * float(p_ret)
    return (1.0 - lam) * np.asarray(p_cls, dtype=np.float64) + lam * np.asarray(p_ret, dtype=np.float64)


def bank_digest(embeddings: np.ndarray, entries: Sequence[SupportEntry]) -> str:
    """See ``SupportBank.digest``; the byte count is hashed first so the two parts cannot run together."""
    emb = np.ascontiguousarray(embeddings, dtype="<f4")
    doc = json.dumps([asdict(e) for e in entries], sort_keys=True, separators=(",", ":")).encode("utf-8")
    h = hashlib.sha256(BANK_DIGEST_DOMAIN)
    h.update(emb.nbytes.to_bytes(8, "little"))
    h.update(emb.tobytes())
    h.update(doc)
    return h.hexdigest()


EMPTY_BANK_DIGEST = bank_digest(np.zeros((0, 1), np.float32), [])
"""Digest of every empty bank (no embeddings, no entries)."""


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class SupportBank:
    """Labelled support embeddings with a lazily built faiss index."""

    def __init__(self, dim: int, *, exact_max_size: int = EXACT_INDEX_MAX_SIZE) -> None:
        if dim < 1:
            raise ValueError(f"embedding dimension must be positive, got {dim}")
        self.dim = dim
        self.exact_max_size = exact_max_size
        self._emb = np.zeros((0, dim), dtype=np.float32)
        self._entries: list[SupportEntry] = []
        self._next_id = 0
        self._index: faiss.Index | None = None
        self._digest: str | None = None
        self._labels: np.ndarray | None = None
        # Scoring threads share one bank: the lazily built index and digest are made once, under this lock.
        self._lazy_lock = threading.Lock()

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def embeddings(self) -> np.ndarray:
        return self._emb

    @property
    def entries(self) -> list[SupportEntry]:
        return list(self._entries)

    @property
    def labels(self) -> np.ndarray:
        """(N,) 1 for fake, 0 for real; read-only.

        Made once per bank content: rebuilding it from the entries on every query cost
        more than the faiss search itself (0.4 ms for 2000 entries).
        """
        with self._lazy_lock:
            if self._labels is None:
                labels = np.fromiter((e.is_fake for e in self._entries), dtype=np.int64, count=len(self._entries))
                labels.setflags(write=False)
                self._labels = labels
            return self._labels

    def add(self, embeddings: np.ndarray, entries: Sequence[SupportEntry]) -> list[int]:
        """Append embeddings (normalised here) with their entries; returns the assigned ids."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}), got {emb.shape}")
        if emb.shape[0] != len(entries):
            raise ValueError(f"{emb.shape[0]} embeddings but {len(entries)} entries")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or infinity")
        ids = list(range(self._next_id, self._next_id + len(entries)))
        self._next_id += len(entries)
        self._emb = np.concatenate([self._emb, l2_normalise(emb)], axis=0)
        self._entries.extend(replace(e, id=i) for e, i in zip(entries, ids))
        self._changed()
        return ids

    def remove(self, *, ids: Iterable[int] | None = None, generator: str | None = None,
               label: str | None = None, modality: str | None = None) -> int:
        """Remove entries matching every given criterion; returns how many were removed."""
        if ids is None and generator is None and label is None and modality is None:
            raise ValueError("remove needs at least one criterion")
        id_set = set(ids) if ids is not None else None

        def matches(e: SupportEntry) -> bool:
            return ((id_set is None or e.id in id_set)
                    and (generator is None or e.generator == generator)
                    and (label is None or e.label == label)
                    and (modality is None or e.modality == modality))

        keep = np.array([not matches(e) for e in self._entries], dtype=bool)
        removed = int((~keep).sum())
        if removed:
            self._emb = self._emb[keep] if len(keep) else self._emb
            self._entries = [e for e, k in zip(self._entries, keep) if k]
            self._changed()
        return removed

    def _changed(self) -> None:
        with self._lazy_lock:
            self._index = None
            self._digest = None
            self._labels = None

    def list(self) -> list[SupportEntry]:
        return self.entries

    def digest(self) -> str:
        """sha256 (hex) of the bank's content: embeddings bytes, then the entries as canonical JSON.

        Two banks with the same digest give the same retrieval scores, so the digest
        is part of ``model_version``: a bank edit that can change scores changes it.
        Embeddings are hashed as little-endian float32 in row order, entries as
        ``json.dumps([asdict(e)...], sort_keys=True, separators=(",", ":"))``. An empty
        bank always has ``EMPTY_BANK_DIGEST``, whatever its dimension.
        """
        with self._lazy_lock:
            if self._digest is None:
                self._digest = bank_digest(self._emb, self._entries)
            return self._digest

    def summary(self) -> dict[str, int]:
        """Entry counts per "label/modality/generator"."""
        counts: dict[str, int] = {}
        for e in self._entries:
            key = f"{e.label}/{e.modality}/{e.generator}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    # ------------------------------------------------------------------ search
    @property
    def index_kind(self) -> str:
        return "hnsw" if len(self) > self.exact_max_size else "flat"

    def _build_index(self) -> faiss.Index:
        if self.index_kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        else:
            index = faiss.IndexFlatIP(self.dim)
        if len(self):
            index.add(np.ascontiguousarray(self._emb))
        return index

    @property
    def index(self) -> faiss.Index:
        with self._lazy_lock:
            if self._index is None:
                self._index = self._build_index()
            return self._index

    def query(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours: ``sims`` (B, k') float32 and ``idx`` (B, k') int64 row positions, k' = min(k, N).

        HNSW can return fewer than k' hits for a query; missing slots have index -1
        and similarity -inf (weight 0 in ``retrieval_probability``).
        """
        q = l2_normalise(np.atleast_2d(np.asarray(embeddings, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have dimension {self.dim}, got {q.shape[1]}")
        k_eff = min(int(k), len(self))
        if k_eff <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        index = self.index
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = max(HNSW_EF_SEARCH_MIN, 2 * k_eff)
        sims, idx = index.search(np.ascontiguousarray(q), k_eff)
        sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
        return sims, idx.astype(np.int64)

    def fake_probability(self, embeddings: np.ndarray, k: int, temperature: float) -> np.ndarray | None:
        """Retrieval fake probability per query row, or None for an empty bank."""
        if len(self) == 0 or k <= 0:
            return None
        sims, idx = self.query(embeddings, k)
        labels = np.where(idx >= 0, self.labels[np.maximum(idx, 0)], 0)
        return retrieval_probability(sims, labels, temperature)

    # ------------------------------------------------------------------ storage
    def save(self, folder: Path) -> None:
        """Write the bank to ``folder``, replacing it atomically (temp folder + rename)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.save(tmp / EMBEDDINGS_FILE, self._emb, allow_pickle=False)
            doc = {
                "format_version": BANK_FORMAT_VERSION,
                "dim": self.dim,
                "next_id": self._next_id,
                "entries": [asdict(e) for e in self._entries],
            }
            (tmp / ENTRIES_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            # mkdtemp makes a private (0700) folder; a bank must be readable like any other file.
            os.chmod(tmp, 0o777 & ~current_umask())
            old = None
            if folder.exists():
                old = folder.parent / f".{folder.name}.old.{os.getpid()}"
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path, *, exact_max_size: int = EXACT_INDEX_MAX_SIZE) -> SupportBank:
        folder = Path(folder)
        entries_path, emb_path = folder / ENTRIES_FILE, folder / EMBEDDINGS_FILE
        for p in (entries_path, emb_path):
            if not p.is_file():
                raise BankFormatError(p, "missing file")
        try:
            doc = json.loads(entries_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BankFormatError(entries_path, f"not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format_version") != BANK_FORMAT_VERSION:
            version = doc.get("format_version") if isinstance(doc, dict) else None
            raise BankFormatError(entries_path, f"unknown bank format version {version!r}")
        try:
            emb = np.load(emb_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BankFormatError(emb_path, f"cannot read embeddings: {exc}") from exc
        try:
            dim = int(doc["dim"])
            entries = [SupportEntry(**e) for e in doc["entries"]]
            next_id = int(doc["next_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BankFormatError(entries_path, f"malformed entries: {exc}") from exc
        if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape != (len(entries), dim):
            raise BankFormatError(emb_path, f"embeddings {emb.dtype} {emb.shape} do not match "
                                            f"{len(entries)} entries of dimension {dim}")
        if len({e.id for e in entries}) != len(entries) or any(e.id < 0 or e.id >= next_id for e in entries):
            raise BankFormatError(entries_path, "entry ids are not unique or out of range")
        bank = cls(dim, exact_max_size=exact_max_size)
        bank._emb = np.ascontiguousarray(emb)
        bank._entries = entries
        bank._next_id = next_id
        return bank
