"""From a file or a DICOM dataset to model input.

One code path for DICOM and PNG/JPEG/TIFF: the bytes are decoded into
display-ready frames in [0, 1] (:mod:`detector.pixels`), then every input
gets the same two views:

* ``semantic``: the whole frame resized (bilinear, antialiased) to the
  backbone size and CLIP-normalised;
* ``noise``: a centre crop at native resolution, never resampled, because
  the generator traces live in the high frequencies that resizing destroys.
  Frames smaller than the crop are reflect-padded around the centre.

Nothing here knows about models; every failure is a
:class:`~detector.errors.PreprocessError` naming the input and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom import dcmread
from pydicom.dataset import Dataset

from detector.errors import (
    ImageTooLargeError,
    PreprocessError,
    UnsupportedPixelDataError,
)
from detector.pixels import DecodedDicom, DecodeLimits, decode_dataset, decode_image

__all__ = [
    "PreparedImage",
    "PreprocessConfig",
    "noise_crop",
    "prepare_dataset",
    "prepare_decoded",
    "prepare_file",
    "prepare_frames",
    "semantic_view",
]


# Elements larger than this stay on disk until needed, so that a header
# declaring too many pixels is refused before its pixel data is even read.
_DEFER_SIZE = "4 MB"
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


class PreprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    semantic_size: int = Field(64, ge=8)          # side of the semantic view: the backbone's image size
    noise_crop: int = Field(64, ge=8)             # side of the native-resolution noise crop
    max_frames: int = Field(4, ge=1)              # frames sampled from a multi-frame object
    frame_rule: Literal["even", "first", "middle"] = "even"
    max_pixels: int = Field(512 * 1024 * 1024, ge=1)  # Rows x Columns x Frames x Samples, checked before decoding
    percentile_window: tuple[float, float] = (0.5, 99.5)  # VOI fallback when the dataset has no window
    noise_position: Literal["center"] = "center"

    def decode_limits(self) -> DecodeLimits:
        """The settings that decoding uses (``detector.pixels.decode_dataset``)."""
        return DecodeLimits(
            max_frames=self.max_frames,
            frame_rule=self.frame_rule,
            max_pixels=self.max_pixels,
            percentiles=self.percentile_window,
        )

    @field_validator("percentile_window")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentile_window must satisfy 0 <= low < high <= 100, got {value}")
        return value


@dataclass(frozen=True)
class PreparedImage:
    source: str                    # file path or "SOP <uid>"
    modality: str                  # DICOM Modality, or "OT"/"unknown" for image files
    sop_instance_uid: str | None
    frame_indices: tuple[int, ...] # frames that were sampled (0 for single frame)
    semantic: torch.Tensor         # (F, 3, S, S) float32, CLIP-normalised, resized to the backbone size
    noise: torch.Tensor            # (F, 3, C, C) float32 in [0, 1], native-resolution crop, never resized


# ---------------------------------------------------------------------------- the two views


def semantic_view(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(F, C, H, W) in [0, 1], C = 1 or 3 -> (F, 3, size, size), CLIP-normalised.

    The whole frame is resized (aspect ratio not kept): a crop could drop the
    manipulated region, and the detector is trained on this same view.
    """
    x = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def noise_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """(F, H, W, C) -> (F, size, size, C): centre crop at native resolution.

    A side shorter than ``size`` is reflect-padded, the original pixels kept
    in the middle (offset ``(size - side) // 2``); a longer side is cropped
    from offset ``(side - size) // 2``.  No value is ever interpolated.
    """
    _, h, w, _ = frames.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        # numpy's reflect repeats the reflection when the pad is wider than the
        # image, so even a 1-pixel side pads without interpolation.
        frames = np.pad(
            frames,
            ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
            mode="reflect" if min(h, w) > 1 else "edge",
        )
        h, w = frames.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return frames[:, top : top + size, left : left + size, :]


def prepare_frames(
    frames: list[np.ndarray],
    cfg: PreprocessConfig,
    *,
    source: str,
    modality: str,
    sop_instance_uid: str | None,
    frame_indices: tuple[int, ...],
) -> PreparedImage:
    """Display-ready (H, W, C) float32 frames in [0, 1] -> :class:`PreparedImage`.

    C = 1 (greyscale) is replicated to three channels after resizing and cropping.
    """
    if not frames:
        raise PreprocessError(source, "no frames decoded")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1 or frames[0].ndim != 3 or frames[0].shape[2] not in (1, 3):
        raise UnsupportedPixelDataError(source, f"frames differ in shape or channels: {sorted(shapes)}")
    stack = np.stack(frames).astype(np.float32, copy=False)  # (F, H, W, C)
    crop = np.ascontiguousarray(noise_crop(stack, cfg.noise_crop).transpose(0, 3, 1, 2))
    noise = torch.from_numpy(crop).expand(-1, 3, -1, -1).contiguous()
    full = torch.from_numpy(stack).permute(0, 3, 1, 2)
    semantic = semantic_view(full, cfg.semantic_size)
    # normalise_* already refuse non-finite input; this guards the resize.
    # (numpy: torch's threaded kernels cost more than the check on small tensors)
    if not (np.isfinite(semantic.numpy()).all() and np.isfinite(crop).all()):
        raise PreprocessError(source, "preprocessing produced non-finite values")
    return PreparedImage(
        source=source,
        modality=modality,
        sop_instance_uid=sop_instance_uid,
        frame_indices=tuple(int(i) for i in frame_indices),
        semantic=semantic,
        noise=noise,
    )


# -------------------------------------------------------------------------------- entry points


def _clean_modality(value: object, default: str = "OT") -> str:
    text = str(value or "").strip().upper()
    return text or default


def prepare_dataset(
    ds: Dataset,
    cfg: PreprocessConfig | None = None,
    source: str | None = None,
    *,
    modality: str | None = None,
) -> PreparedImage:
    """Prepare a DICOM dataset (e.g. one received over C-STORE).

    ``source`` names the input in errors; it defaults to ``"SOP <uid>"``.
    ``modality`` overrides the dataset's Modality (default ``"OT"``).
    """
    cfg = cfg or PreprocessConfig()
    return prepare_decoded(decode_dataset(ds, source, cfg.decode_limits()), cfg, modality=modality)


def prepare_decoded(decoded: DecodedDicom, cfg: PreprocessConfig, *, modality: str | None = None) -> PreparedImage:
    """The model's two views of a decoded data set (``detector.pixels.decode_dataset``).

    ``modality`` overrides the data set's Modality (default ``"OT"``).
    """
    source = decoded.source
    try:
        return prepare_frames(
            decoded.frames,
            cfg,
            source=source,
            modality=_clean_modality(decoded.modality if modality is None else modality),
            sop_instance_uid=decoded.sop_instance_uid,
            frame_indices=decoded.frame_indices,
        )
    except PreprocessError:
        raise
    except Exception as exc:  # the contract: no raw torch/numpy error leaves this module
        raise PreprocessError(source, f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc


def _looks_like_dicom(ds: Dataset) -> bool:
    try:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("TransferSyntaxUID"):
            return True
        return any(tag in ds for tag in (0x00080016, 0x00080018, 0x00280010, 0x7FE00010))
    except Exception:
        return False


def _read_dicom(path: Path, source: str, *, require_dicom_like: bool) -> Dataset:
    try:
        ds = dcmread(path, force=True, defer_size=_DEFER_SIZE)
    except Exception as exc:
        if require_dicom_like:
            raise PreprocessError(source, "not a DICOM file or a supported image (PNG, JPEG, TIFF)") from exc
        raise PreprocessError(source, f"unreadable DICOM file: {' '.join(str(exc).split())[:300]}") from exc
    if require_dicom_like and not _looks_like_dicom(ds):
        raise PreprocessError(source, "not a DICOM file or a supported image (PNG, JPEG, TIFF)")
    return ds


def _prepare_image_file(path: Path, cfg: PreprocessConfig, source: str, modality: str | None) -> PreparedImage:
    try:
        with Image.open(path, formats=_PIL_FORMATS) as image:
            indices, frames = decode_image(image, source, **cfg.decode_limits().as_kwargs())
        return prepare_frames(
            frames,
            cfg,
            source=source,
            modality=_clean_modality(modality),
            sop_instance_uid=None,
            frame_indices=indices,
        )
    except PreprocessError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(source, f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise PreprocessError(source, "unreadable image file") from exc
    except Exception as exc:
        raise PreprocessError(source, f"cannot read image: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc


def prepare_file(
    path: str | os.PathLike[str],
    cfg: PreprocessConfig | None = None,
    modality: str | None = None,
) -> PreparedImage:
    """Prepare a DICOM file or a PNG/JPEG/TIFF image, chosen on content, not name.

    DICOM: the "DICM" marker at offset 128, or (no preamble) a stream pydicom
    can parse into something with DICOM attributes.  ``modality`` overrides
    the DICOM Modality; image files are ``"OT"`` unless it is given.
    """
    cfg = cfg or PreprocessConfig()
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except FileNotFoundError as exc:
        raise PreprocessError(source, "file not found") from exc
    except IsADirectoryError as exc:
        raise PreprocessError(source, "is a directory, not a file") from exc
    except OSError as exc:
        raise PreprocessError(source, f"cannot read file: {exc.strerror or exc}") from exc
    if not head:
        raise PreprocessError(source, "file is empty")

    if head[128:132] == b"DICM":
        ds = _read_dicom(path, source, require_dicom_like=False)
        return prepare_dataset(ds, cfg, source, modality=modality)
    if (
        head.startswith(_PNG)
        or head.startswith(_JPEG)
        or head.startswith(_TIFF)
        or head.startswith(b"BM")
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    ):
        return _prepare_image_file(path, cfg, source, modality)
    ds = _read_dicom(path, source, require_dicom_like=True)
    return prepare_dataset(ds, cfg, source, modality=modality)
