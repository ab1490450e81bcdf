"""Training: from a labelled data set to a bundle.

1. Discover the data set; fakes of ``holdout_generators`` are kept out of training
   and validation (they measure generalisation to unseen generators); the seen
   samples are split per (modality, generator) into train and validation.
2. Train the method's trainable parameters only (AdamW, cross-entropy) with a
   deterministic order for the seed. After every epoch ``OUT/.train_state.pt``
   holds the trainable state, the optimiser, the epoch and the RNG states, so an
   interrupted run continues with ``resume=True`` (and a finished one can be
   extended by asking for more epochs).
3. Save the bundle, load it back the way the node will, build the retrieval
   bank from embeddings of (a capped, stratified subset of) the training images,
   pick the threshold that maximises balanced accuracy of the fused score on the
   validation split (never on test data), and record validation metrics. The
   classifier score alone (λ = 0) gets its own threshold, chosen the same way
   (``classifier_threshold``), so "without MFRM" accuracies are a fair comparison.

``device`` (cpu, cuda, cuda:N) holds the model and every batch; the retrieval
bank and the saved state stay on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from detector.backbone import sha256_file
from detector.bundle import (
    MANIFEST_FILE,
    Manifest,
    RetrievalSettings,
    record_bank_change,
    save_bundle,
    update_manifest,
)
from detector.calibration import CalibrationSet, save_calibration
from detector.dataset import (
    DatasetError,
    PreparedDataset,
    Sample,
    collate_frames,
    discover,
    parse_generators,
    split_holdout,
    stratified_split,
    summarise,
)
from detector.detector import Detector, resolve_device
from detector.errors import DetectorError
from detector.evaluate import score_samples, scored_samples
from detector.methods import METHODS, build_model
from detector.metrics import best_threshold, grouped_metrics
from detector.preprocess import PreprocessConfig
from detector.retrieval import SupportEntry
from detector.spec import CLIP_METHODS, BackboneSpec, CDFASpec, HeadSpec, ModelSpec
from detector.tiny import register_tiny_models

logger = logging.getLogger(__name__)

STATE_FILE = ".train_state.pt"
STATE_FORMAT = 1
CACHE_LIMIT_BYTES = 1 << 30  # prepared tensors are kept in memory below this estimate


class TrainingError(DetectorError):
    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class TrainResult:
    bundle: Path
    manifest: Manifest
    epochs: int                     # epochs the bundle's weights have seen
    start_epoch: int                # > 0 when resumed
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch (all epochs)
    threshold: float = 0.5
    classifier_threshold: float = 0.5
    validation: dict[str, Any] = field(default_factory=dict)


def backbone_image_size(name: str) -> int:
    register_tiny_models()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise TrainingError(name, f"unknown open_clip architecture; known include {', '.join(open_clip.list_models()[:8])}, ...")
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    """"2,5,8" -> (2, 5, 8); None or "" -> None (evenly spaced blocks)."""
    if not text or not text.strip():
        return None
    try:
        blocks = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise TrainingError("cdfa-blocks", f"expected comma-separated block indices like 2,5,8, got {text!r}") from None
    if not blocks or min(blocks) < 0:
        raise TrainingError("cdfa-blocks", f"block indices must be >= 0, got {text!r}")
    return blocks


def make_spec(method: str, backbone: str, checkpoint: Path | None, *, cdfa: CDFASpec | None = None,
              head: HeadSpec | None = None, noise_crop: int = 64) -> ModelSpec:
    if method not in METHODS:
        raise TrainingError("method", f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    if method not in CLIP_METHODS and checkpoint is not None:
        # The file would be hashed and recorded but never used: a misleading manifest.
        raise TrainingError(checkpoint, f"method {method} has no CLIP backbone; do not pass --checkpoint")
    sha = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint).resolve()
        if not checkpoint.is_file():
            raise TrainingError(checkpoint, "checkpoint file not found")
        sha = sha256_file(checkpoint)
    return ModelSpec(method=method, backbone=BackboneSpec(  # type: ignore[arg-type]
        name=backbone, checkpoint=checkpoint, checkpoint_sha256=sha, image_size=backbone_image_size(backbone)),
        cdfa=cdfa or CDFASpec(), head=head or HeadSpec(), noise_crop=noise_crop)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed every RNG and ask torch for deterministic kernels; restore the global switch afterwards."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def _fingerprint(samples: Sequence[Sample], **settings: Any) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path}\t{s.label}\t{s.modality}\t{s.generator}\n".encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def _save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                losses: list[float], loader_gen: torch.Generator, fingerprint: str) -> None:
    state = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "losses": list(losses),
        "trainable": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                      if not model.is_frozen_key(k)},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "loader_rng": loader_gen.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: say which and why
        raise TrainingError(path, f"cannot read training state: {type(exc).__name__}: {exc}") from exc
    if state.get("format") != STATE_FORMAT:
        raise TrainingError(path, f"unknown training state format {state.get('format')!r}")
    if state.get("fingerprint") != fingerprint:
        raise TrainingError(path, "training state belongs to another run (data, method, backbone, seed or "
                                  "hyper-parameters differ); start without --resume or use another --out")
    return state


def _bank_subset(samples: Sequence[Sample], max_size: int, seed: int) -> list[Sample]:
    if len(samples) <= max_size:
        return list(samples)
    _, part = stratified_split(samples, max_size / len(samples), seed)
    return part[:max_size]


def _progress(enabled: bool, description: str, total: int):  # pragma: no cover - display only
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not enabled,
                        transient=False)
    task = progress.add_task(description, total=total, info="")
    return progress, task


def train(
    data: Path | str,
    out: Path | str,
    *,
    method: str = "dski",
    backbone: str = "dski-tiny",
    checkpoint: Path | str | None = None,
    epochs: int = 5,
    holdout_generators: str | Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.2,
    resume: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    version: str = "0.1.0",
    retrieval: RetrievalSettings | None = None,
    bank_max_size: int = 2000,
    max_frames: int = 4,
    cdfa_blocks: Sequence[int] | None = None,
    cdfa_num_blocks: int | None = None,
    bottleneck: int | None = None,
    context_tokens: int | None = None,
    noise_stem: str | None = None,
    noise_crop: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train ``method`` on ``data`` and write the bundle folder ``out``; see the module docstring.

    ``cdfa_blocks``, ``cdfa_num_blocks``, ``bottleneck``, ``context_tokens`` and
    ``noise_stem`` (None: the ``ModelSpec`` default) configure DSKI only and are refused
    for other methods.
    """
    if epochs < 0:
        raise TrainingError("epochs", f"must be >= 0, got {epochs}")
    if batch_size < 1:
        raise TrainingError("batch-size", f"must be >= 1, got {batch_size}")
    dski_only = {"cdfa-blocks": cdfa_blocks, "cdfa-num-blocks": cdfa_num_blocks, "bottleneck": bottleneck,
                 "context-tokens": context_tokens, "noise-stem": noise_stem}
    given = [f"--{k}" for k, v in dski_only.items() if v is not None]
    if method != "dski" and given:
        raise TrainingError(method, f"{', '.join(given)} configure DSKI only, not method {method}")
    if noise_stem not in (None, "conv", "patch"):
        raise TrainingError("noise-stem", f"must be conv or patch, got {noise_stem!r}")
    if cdfa_blocks is not None and cdfa_num_blocks is not None:
        raise TrainingError("cdfa-blocks", "give --cdfa-blocks or --cdfa-num-blocks, not both")
    torch_device = resolve_device(device)
    data, out = Path(data), Path(out)
    holdout = parse_generators(holdout_generators)
    retrieval = retrieval or RetrievalSettings()
    state_path = out / STATE_FILE
    if (out / MANIFEST_FILE).exists() and not (resume or overwrite):
        raise TrainingError(out, "a bundle already exists here; pass --resume to continue its training "
                                 "or --overwrite to replace it")

    samples = discover(data)
    seen, held = split_holdout(samples, holdout)
    train_s, val_s = stratified_split(seen, val_fraction, seed)
    for part, label in ((train_s, "training"), (val_s, "validation")):
        if {s.label for s in part} != {0, 1}:
            raise DatasetError(data, f"the {label} split needs real and fake images "
                                     f"(got {summarise(part)['n_real']} real, {summarise(part)['n_fake']} fake)")
    cdfa = CDFASpec(**{k: v for k, v in (("blocks", None if cdfa_blocks is None else tuple(cdfa_blocks)),
                                         ("num_blocks", cdfa_num_blocks), ("bottleneck", bottleneck),
                                         ("noise_stem", noise_stem))
                       if v is not None})
    head = HeadSpec() if context_tokens is None else HeadSpec(context_tokens=context_tokens)
    spec = make_spec(method, backbone, Path(checkpoint) if checkpoint is not None else None,
                     cdfa=cdfa, head=head, noise_crop=noise_crop)
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop,
                           max_frames=max_frames)
    # The device is left out on purpose: a run may resume on other hardware.
    fingerprint = _fingerprint(samples, method=method, backbone=backbone, checkpoint=spec.backbone.checkpoint_sha256,
                               holdout=holdout, seed=seed, batch_size=batch_size, lr=lr,
                               weight_decay=weight_decay, val_fraction=val_fraction, max_frames=max_frames,
                               cdfa=spec.cdfa.model_dump_json(), head=spec.head.model_dump_json(),
                               noise_crop=spec.noise_crop)

    with deterministic(seed):
        model = build_model(spec).to(torch_device)
        params = model.trainable_parameters()
        if not params:
            raise TrainingError(method, "the model has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        loader_gen = torch.Generator().manual_seed(seed)
        start_epoch, losses = 0, []
        if resume and state_path.exists():
            state = _load_state(state_path, fingerprint)
            model.load_state_dict(state["trainable"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            loader_gen.set_state(state["loader_rng"])
            start_epoch, losses = int(state["epoch"]), list(state["losses"])
            logger.info("resuming training", extra={"bundle": str(out), "epoch": start_epoch})
            if start_epoch > epochs:
                raise TrainingError(state_path, f"the saved run has already trained {start_epoch} epochs, "
                                                f"more than the {epochs} asked for")
        elif resume:
            logger.warning("no training state to resume, starting from scratch", extra={"bundle": str(out)})

        per_image = 4 * 3 * (cfg.semantic_size ** 2 + cfg.noise_crop ** 2)
        dataset = PreparedDataset(train_s, cfg, model.modality_index,
                                  cache=len(train_s) * per_image <= CACHE_LIMIT_BYTES)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=loader_gen,
                            num_workers=0, collate_fn=collate_frames)
        out.mkdir(parents=True, exist_ok=True)
        bar, task = _progress(progress, "training", max(epochs - start_epoch, 0) * len(loader))
        with bar:
            for epoch in range(start_epoch, epochs):
                model.train()
                total, count = 0.0, 0
                for semantic, noise, labels, modality in loader:
                    semantic, noise = semantic.to(torch_device), noise.to(torch_device)
                    labels, modality = labels.to(torch_device), modality.to(torch_device)
                    logits = model(semantic, noise, modality)
                    loss = F.cross_entropy(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * labels.shape[0]
                    count += labels.shape[0]
                    bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.4f}")
                losses.append(total / max(count, 1))
                logger.info("epoch done", extra={"epoch": epoch + 1, "loss": losses[-1]})
                _save_state(state_path, model, optimizer, epoch + 1, losses, loader_gen, fingerprint)
    model.eval()

    training = {
        "data": str(data),
        "method": method,
        "backbone": backbone if method in CLIP_METHODS else None,  # npr and cnnspot have none
        "device": str(torch_device),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "val_fraction": val_fraction,
        "holdout_generators": list(holdout),
        "losses": losses,
        "threshold_rule": "maximum balanced accuracy on the validation split: of the fused score (threshold) "
                          "and of the classifier score alone (classifier_threshold)",
        "train": summarise(train_s),
        "validation": summarise(val_s),
        "held_out": summarise(held),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    if method not in CLIP_METHODS:
        default_name = method
    else:
        default_name = backbone if backbone.startswith(f"{method}-") else f"{method}-{backbone}"
    save_bundle(out, model, spec, cfg, name=name or default_name, version=version, threshold=0.5,
                retrieval=retrieval, training=training)

    # From here on everything uses the bundle as loaded from disk, as the node will.
    detector = Detector.load(out, device=torch_device, batch_size=max(batch_size, 1))
    bank_samples = _bank_subset(train_s, bank_max_size, seed)
    scored, errors = score_samples(detector, bank_samples)
    if errors:
        raise TrainingError(errors[0]["path"], errors[0]["error"])
    entries = [SupportEntry("fake" if s.label else "real", s.modality, s.generator, str(s.path)) for s, _ in scored]
    emb = np.stack([f.embeddings.mean(axis=0) for _, f in scored]).astype(np.float32)
    detector.bank.add(emb, entries)
    record_bank_change(out, detector.bank, "train", count=len(entries))

    val_scored, errors = score_samples(detector, val_s)
    if errors:
        raise TrainingError(errors[0]["path"], errors[0]["error"])
    # The validation images, as held-out evidence for re-choosing λ when the bank changes later.
    save_calibration(out, CalibrationSet.from_frame_scores(
        [(f.classifier, f.embeddings) for _, f in val_scored], [int(s.label) for s, _ in val_scored],
        [s.modality for s, _ in val_scored], [s.generator for s, _ in val_scored]))
    fused = scored_samples(val_scored, detector.lam)
    threshold = best_threshold([s.label for s in fused], [s.score for s in fused])
    # The classifier alone gets a threshold chosen for it: judging it at the fused score's
    # threshold would understate its accuracies (AUC and AP do not depend on either).
    classifier = scored_samples(val_scored, 0.0)
    cls_threshold = best_threshold([s.label for s in classifier], [s.score for s in classifier])
    metrics: dict[str, Any] = {"validation": {
        "with_mfrm": grouped_metrics(fused, threshold),
        "without_mfrm": grouped_metrics(classifier, cls_threshold),
    }}
    if held:
        held_scored, errors = score_samples(detector, held + [s for s in val_s if not s.label])
        metrics["held_out_generators"] = {
            "note": "fakes of the held-out generators against the validation reals",
            "with_mfrm": grouped_metrics(scored_samples(held_scored, detector.lam), threshold),
            "without_mfrm": grouped_metrics(scored_samples(held_scored, 0.0), cls_threshold),
            "errors": errors,
        }
    training["bank"] = detector.bank.summary()
    manifest = update_manifest(out, threshold=threshold, classifier_threshold=cls_threshold, metrics=metrics,
                               training=training)
    logger.info("training done", extra={"bundle": str(out), "threshold": threshold,
                                        "classifier_threshold": cls_threshold, "epochs": epochs})
    return TrainResult(bundle=out, manifest=manifest, epochs=epochs, start_epoch=start_epoch, losses=losses,
                       threshold=threshold, classifier_threshold=cls_threshold, validation=metrics["validation"])
