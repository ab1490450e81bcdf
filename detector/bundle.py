"""Model bundles: everything needed to rebuild a trained detector, in one folder.

```
BUNDLE/
  manifest.json        format version, name, semantic version, spec, preprocessing,
                       thresholds, retrieval settings, training summary, metrics, weights sha256,
                       the append-only history of bank edits (``bank_history``)
  weights.safetensors  the model's state dict
  bank/                the MFRM support bank (``detector.retrieval``)
```

When the backbone comes from a checkpoint file, the frozen backbone weights
(``model.frozen_prefixes``) are left out of ``weights.safetensors``: the
checkpoint, verified by its sha256 in the spec, supplies them at load time. A
tiny random backbone has no checkpoint, so its weights are kept.

A bundle's identity in verdicts and SR UIDs is ``model_version``: name, version,
weights sha256 and the bank digest, because a bank edit changes scores without
touching the weights.

Loading validates everything it reads and raises ``BundleError(path, reason)``
naming the offending file; a missing or mismatching backbone checkpoint is a
``CheckpointError`` from ``detector.backbone``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from detector.backbone import sha256_file
from detector.errors import BundleError
from detector.preprocess import PreprocessConfig
from detector.retrieval import BankFormatError, SupportBank
from detector.spec import CLIP_METHODS, ModelSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
BANK_DIR = "bank"
CLINICAL_USE_NOTE = (
    "not clinically validated: research tool for forensic screening; "
    "a verdict is no diagnosis and no proof of manipulation"
)
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class RetrievalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(8, ge=1)
    lam: float = Field(0.3, ge=0.0, le=1.0)
    temperature: float = Field(0.05, gt=0.0)


class BankEvent(BaseModel):
    """One change of the support bank, as recorded in ``Manifest.bank_history`` (append-only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: str                                   # UTC ISO time of the change
    action: Literal["train", "add", "remove"]   # train: the bank built by ``dski train``
    label: str | None = None                    # criteria of the change (None: not restricted)
    generator: str | None = None
    modality: str | None = None
    ids: list[int] | None = None                # entry ids added or asked to be removed
    count: int = Field(ge=0)                    # entries added or removed
    bank_size: int = Field(ge=0)                # entries after the change
    bank_digest: str = Field(pattern=r"^[0-9a-f]{64}$")  # ``SupportBank.digest()`` after the change
    # λ and threshold re-chosen for the new bank (``detector.calibration``); None: left as they were
    fusion: dict[str, Any] | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    name: str = Field(min_length=1)
    version: str
    created_at: str
    method: str
    spec: ModelSpec
    preprocess: PreprocessConfig
    threshold: float = Field(ge=0.0, le=1.0)           # for the fused (with MFRM) score
    # Chosen the same way for the classifier score alone (λ = 0), so that "without MFRM"
    # accuracies are not judged at a threshold tuned for the fused score. None: older bundle.
    classifier_threshold: float | None = Field(None, ge=0.0, le=1.0)
    retrieval: RetrievalSettings
    embedding_dim: int = Field(ge=1)
    backbone_weights_included: bool
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bank_history: list[BankEvent] = []  # every bank change since the bundle was written, oldest first
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    clinical_use: str = CLINICAL_USE_NOTE

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError(f"version {v!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return v


@dataclass
class LoadedBundle:
    path: Path
    manifest: Manifest
    model: torch.nn.Module
    bank: SupportBank
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.manifest.preprocess

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.spec

    @property
    def model_version(self) -> str:
        return model_version(self.manifest, self.bank)


def model_version(manifest: Manifest, bank: SupportBank) -> str:
    """``<name>@<version>+w<weights sha256[:12]>.b<bank digest[:8]>``.

    The node derives SR UIDs from this string, so it must change whenever scores can
    change: new weights, or a ``dski bank add/remove`` (which leaves weights and
    version alone). The bank digest is computed from the bank in memory, i.e. the
    one that scores.
    """
    return f"{manifest.name}@{manifest.version}+w{manifest.weights_sha256[:12]}.b{bank.digest()[:8]}"


def _is_frozen_key(model: torch.nn.Module, key: str) -> bool:
    """``ForensicModel.is_frozen_key``: prefixes end in ".", other entries are exact keys."""
    return bool(model.is_frozen_key(key))


def _omit_backbone(spec: ModelSpec) -> bool:
    # npr and cnnspot have no CLIP backbone: every tensor they need is in the weights file.
    return spec.method in CLIP_METHODS and spec.backbone.checkpoint is not None


def bundle_state_dict(model: torch.nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The tensors a bundle stores: all of them, less the frozen backbone when a checkpoint supplies it."""
    omit = _omit_backbone(spec)
    # clone(): safetensors refuses tensors that share storage.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if not (omit and _is_frozen_key(model, k))}


@torch.inference_mode()
def embedding_dim(model: torch.nn.Module, spec: ModelSpec) -> int:
    """Dimension of ``model.embed`` found by one dummy forward."""
    s, c = spec.backbone.image_size, spec.noise_crop
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        emb = model.embed(torch.zeros(1, 3, s, s, device=device), torch.zeros(1, 3, c, c, device=device))
    finally:
        model.train(was_training)
    return int(emb.shape[-1])


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_bundle(
    path: Path | str,
    model: torch.nn.Module,
    spec: ModelSpec,
    preprocess: PreprocessConfig,
    *,
    name: str,
    version: str,
    threshold: float,
    classifier_threshold: float | None = None,
    retrieval: RetrievalSettings | None = None,
    bank: SupportBank | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Write a bundle folder (created if needed; existing bundle files are replaced)."""
    path = Path(path)
    if preprocess.semantic_size != spec.backbone.image_size or preprocess.noise_crop != spec.noise_crop:
        raise ValueError(
            f"preprocessing ({preprocess.semantic_size} px semantic, {preprocess.noise_crop} px noise crop) "
            f"does not match the spec ({spec.backbone.image_size} px, {spec.noise_crop} px)")
    path.mkdir(parents=True, exist_ok=True)
    dim = embedding_dim(model, spec)
    bank = bank if bank is not None else SupportBank(dim)
    if bank.dim != dim:
        raise ValueError(f"bank dimension {bank.dim} != model embedding dimension {dim}")

    weights = path / WEIGHTS_FILE
    tmp_weights = path / f".{WEIGHTS_FILE}.tmp"
    save_file(bundle_state_dict(model, spec), str(tmp_weights), metadata={"format": "pt"})
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp_weights, 0o666 & ~mask)  # the node may run as another user than the trainer
    os.replace(tmp_weights, weights)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        method=spec.method,
        spec=spec,
        preprocess=preprocess,
        threshold=float(threshold),
        classifier_threshold=None if classifier_threshold is None else float(classifier_threshold),
        retrieval=retrieval or RetrievalSettings(),
        embedding_dim=dim,
        backbone_weights_included=not _omit_backbone(spec),
        weights_sha256=sha256_file(weights),
        training=training or {},
        metrics=metrics or {},
    )
    bank.save(path / BANK_DIR)
    _write_json_atomic(path / MANIFEST_FILE, manifest.model_dump(mode="json"))
    logger.info("saved bundle", extra={"bundle": str(path), "version": version, "weights_sha256": manifest.weights_sha256})
    return manifest


def read_manifest(path: Path | str) -> Manifest:
    """Parse and validate ``manifest.json`` of a bundle folder."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(path, "bundle folder not found")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(mpath, "missing manifest.json")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(mpath, f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BundleError(mpath, "manifest must be a JSON object")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(mpath, f"unknown bundle format version {doc.get('format_version')!r} "
                                 f"(this build reads version {FORMAT_VERSION})")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise BundleError(mpath, f"invalid manifest: {problems}") from exc


def update_manifest(path: Path | str, **changes: Any) -> Manifest:
    """Rewrite selected manifest fields (e.g. metrics after an evaluation), validated."""
    path = Path(path)
    manifest = read_manifest(path)
    updated = Manifest.model_validate({**manifest.model_dump(mode="json"), **changes})
    if updated.bank_history[:len(manifest.bank_history)] != manifest.bank_history:
        raise ValueError("bank_history is append-only: earlier events cannot be changed or removed")
    _write_json_atomic(path / MANIFEST_FILE, updated.model_dump(mode="json"))
    return updated


def load_bank(path: Path | str, manifest: Manifest | None = None) -> SupportBank:
    path = Path(path)
    manifest = manifest or read_manifest(path)
    bank_dir = path / BANK_DIR
    if not bank_dir.is_dir():
        raise BundleError(bank_dir, "missing bank folder")
    try:
        bank = SupportBank.load(bank_dir)
    except BankFormatError as exc:
        raise BundleError(exc.path, exc.reason) from exc
    if bank.dim != manifest.embedding_dim:
        raise BundleError(bank_dir, f"bank dimension {bank.dim} != model embedding dimension {manifest.embedding_dim}")
    return bank


def save_bank(path: Path | str, bank: SupportBank) -> None:
    """Replace the bank of an existing bundle (weights and manifest untouched)."""
    path = Path(path)
    manifest = read_manifest(path)
    if bank.dim != manifest.embedding_dim:
        raise BundleError(path / BANK_DIR, f"bank dimension {bank.dim} != model embedding dimension "
                                           f"{manifest.embedding_dim}")
    bank.save(path / BANK_DIR)


def record_bank_change(path: Path | str, bank: SupportBank, action: Literal["train", "add", "remove"], *,
                       count: int, label: str | None = None, generator: str | None = None,
                       modality: str | None = None, ids: list[int] | None = None,
                       fusion: dict[str, Any] | None = None) -> BankEvent:
    """Save ``bank`` into the bundle and append the change to the manifest's ``bank_history``.

    ``fusion`` (``FusionChoice.summary()``) sets the manifest's λ and threshold in the same
    manifest write, so the history always names the values the new bank is scored with.
    The bank is written first: if the process dies in between, the history misses the
    last event (``load_bundle`` then warns) rather than naming a bank that was never saved.
    """
    save_bank(path, bank)
    event = BankEvent(time=datetime.now(UTC).isoformat(timespec="seconds"), action=action, label=label,
                      generator=generator, modality=modality, ids=ids, count=count, bank_size=len(bank),
                      bank_digest=bank.digest(), fusion=fusion)
    manifest = read_manifest(path)
    changes: dict[str, Any] = {"bank_history": [*manifest.model_dump(mode="json")["bank_history"],
                                                event.model_dump(mode="json")]}
    if fusion is not None:
        changes["retrieval"] = {**manifest.retrieval.model_dump(), "lam": float(fusion["lam"])}
        changes["threshold"] = float(fusion["threshold"])
    update_manifest(path, **changes)
    logger.info("bank changed", extra={"bundle": str(path), "action": action, "count": count,
                                       "bank_size": len(bank), "bank_digest": event.bank_digest})
    return event


def load_bundle(path: Path | str, device: str | torch.device = "cpu") -> LoadedBundle:
    """Validate and load a bundle: the model in eval mode with cached text embeddings, and its bank."""
    from detector.methods import build_model

    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(weights, "missing weights.safetensors")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise BundleError(weights, f"weights sha256 {actual} does not match the manifest's "
                                   f"{manifest.weights_sha256}: the file was changed or corrupted")
    bank = load_bank(path, manifest)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(weights, f"cannot read weights: {exc}") from exc

    model = build_model(manifest.spec)
    expected = model.state_dict()
    omitted = not manifest.backbone_weights_included
    required = {k for k in expected if not (omitted and _is_frozen_key(model, k))}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in state.keys() & expected.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few(wrong_shape)}" if wrong_shape else ""]
        raise BundleError(weights, "weights do not fit the manifest's model spec; " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=False)
    model.to(device)
    model.prepare_inference()  # eval mode and cached text embeddings
    dim = embedding_dim(model, manifest.spec)
    if dim != manifest.embedding_dim:
        raise BundleError(path / MANIFEST_FILE, f"model embeds to {dim} dimensions, manifest says {manifest.embedding_dim}")
    if manifest.bank_history and manifest.bank_history[-1].bank_digest != bank.digest():
        # Scores and model_version follow the bank on disk; only the audit trail is incomplete.
        logger.warning("bank differs from the last bank_history entry: changed outside `dski bank`",
                       extra={"bundle": str(path), "bank_digest": bank.digest(),
                              "recorded_digest": manifest.bank_history[-1].bank_digest})
    return LoadedBundle(path=path, manifest=manifest, model=model, bank=bank)
