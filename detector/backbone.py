"""The frozen open_clip backbone: architecture by name, weights only from a local file.

Nothing here downloads: a real backbone (ViT-L-14 …) needs ``spec.checkpoint``,
a file whose sha256 is checked against ``spec.checkpoint_sha256`` when the spec
records one.  Only the tiny architectures of ``detector.tiny`` may run with
random weights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from detector.errors import CheckpointError
from detector.spec import BackboneSpec
from detector.tiny import is_tiny_model, register_tiny_models

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Path, expected_sha256: str | None) -> str:
    """Check that the checkpoint exists and matches the recorded hash; return its sha256."""
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found", expected_sha256=expected_sha256)
    actual = sha256_file(path)
    if expected_sha256 is not None and actual.lower() != expected_sha256.strip().lower():
        raise CheckpointError(
            path,
            "sha256 mismatch: the file is not the checkpoint the spec was recorded with",
            expected_sha256=expected_sha256,
            actual_sha256=actual,
        )
    return actual


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_backbone(spec: BackboneSpec) -> tuple[nn.Module, Any]:
    """Build the open_clip model of ``spec`` (frozen, eval mode) and its tokenizer."""
    register_tiny_models()
    if spec.checkpoint is None and not is_tiny_model(spec.name):
        raise CheckpointError(
            f"<no checkpoint for backbone {spec.name}>",
            "real backbones need a local open_clip "
            "checkpoint file (backbone.checkpoint); weights are never downloaded, only the tiny "
            "architectures of detector.tiny run with random weights",
        )
    if spec.checkpoint is not None:
        checkpoint = Path(spec.checkpoint)
        actual = verify_checkpoint(checkpoint, spec.checkpoint_sha256)
    try:
        # pretrained_image/pretrained_text False: timm / HF towers must not fetch weights either.
        clip = open_clip.create_model(
            spec.name, pretrained=None, pretrained_image=False, pretrained_text=False
        )
    except RuntimeError as e:
        raise ValueError(f"unknown open_clip architecture {spec.name!r}: {e}") from e
    if spec.checkpoint is not None:
        try:
            open_clip.load_checkpoint(clip, str(checkpoint), strict=True, weights_only=True)
        except Exception as e:  # pickle, key or shape errors: all mean the file does not fit
            raise CheckpointError(
                checkpoint,
                f"cannot load into {spec.name}: {type(e).__name__}: {e}",
                expected_sha256=spec.checkpoint_sha256,
                actual_sha256=actual,
            ) from e
        logger.info(
            "loaded backbone checkpoint",
            extra={"backbone": spec.name, "checkpoint": str(checkpoint), "sha256": actual},
        )
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    if size != spec.image_size:
        raise ValueError(
            f"backbone {spec.name!r} expects {size} px images but backbone.image_size is {spec.image_size}"
        )
    tokenizer = open_clip.get_tokenizer(spec.name)
    return freeze(clip), tokenizer
