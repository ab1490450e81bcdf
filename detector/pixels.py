"""Decoding of pixel data into display-ready frames in [0, 1].

One representation leaves this module whatever the input: a list of
``(H, W, C)`` float32 arrays in [0, 1], one per sampled frame, with C = 1
for greyscale (replicated to three channels only after resizing and
cropping, which is three times cheaper) and C = 3 for colour.  DICOM and
image files differ only in how the stored values are read; the intensity
steps afterwards (windowing, colour scaling, channel replication) are the
shared functions :func:`normalise_gray` and :func:`normalise_color`.

Every failure raises a :class:`~detector.errors.PreprocessError` subclass
naming the source and the reason; numpy, pydicom and Pillow exceptions are
wrapped, never passed through.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.processing import apply_voi
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from detector.errors import (
    ImageTooLargeError,
    NoPixelDataError,
    PreprocessError,
    UnsupportedPixelDataError,
)

logger = logging.getLogger(__name__)

FrameRule = Literal["even", "first", "middle"]

_PIXEL_TAGS: tuple[tuple[int, str], ...] = (
    (0x7FE00010, "PixelData"),
    (0x7FE00008, "FloatPixelData"),
    (0x7FE00009, "DoubleFloatPixelData"),
)
# The top-level elements decode_dataset reads, besides the File Meta's Transfer Syntax UID:
# SOP Instance UID and Modality; the image pixel, modality LUT, VOI LUT and palette groups
# (0028); the functional groups of enhanced multi-frame objects (5200); the pixel data and
# its offset tables (7FE0). A reader may hand it a data set of only these
# (listener.spool_decode.read_for_decoding); a new element read here must be added.
DECODE_TAGS = frozenset({0x00080018, 0x00080060})
DECODE_GROUPS = frozenset({0x0028, 0x5200, 0x7FE0})
_GRAY = {"MONOCHROME1", "MONOCHROME2"}
_COLOR_IN = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
_SUPPORTED_PI = _GRAY | _COLOR_IN | {"PALETTE COLOR"}
# Percentiles over more samples than this are computed on a regular subsample:
# the window is a robust statistic, and a full sort of a 4k x 4k x 4 stack is
# the most expensive step of the whole preprocessing otherwise.
_PERCENTILE_SAMPLES = 4_000_000
# Item tag (FFFE,E000) little endian: the first bytes of encapsulated pixel data.
_ITEM_TAG = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class Window:
    """A VOI window in modality units (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "LINEAR"


_IDENTITY = Window(0.5, 1.0, "LINEAR_EXACT")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- frames


def sample_frames(n_frames: int, max_frames: int, rule: FrameRule) -> tuple[int, ...]:
    """Indices of the frames to analyse.

    ``even``: all frames when there are at most ``max_frames``, otherwise
    ``max_frames`` evenly spaced indices including the first and the last
    (the middle frame when ``max_frames`` is 1).  ``first``: frame 0.
    ``middle``: frame ``n_frames // 2``.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if rule == "first":
        return (0,)
    if rule == "middle":
        return (n_frames // 2,)
    if n_frames <= max_frames:
        return tuple(range(n_frames))
    if max_frames == 1:
        return (n_frames // 2,)
    picks = np.rint(np.linspace(0, n_frames - 1, max_frames)).astype(int)
    return tuple(sorted({int(i) for i in picks}))


def check_size(source: str, rows: int, columns: int, frames: int, samples: int, max_pixels: int) -> None:
    total = rows * columns * frames * samples
    if total > max_pixels:
        raise ImageTooLargeError(
            source,
            f"header declares {rows} x {columns} pixels x {frames} frame(s) x {samples} sample(s) "
            f"= {total} samples, over the limit of {max_pixels}",
        )


# ------------------------------------------------------------------ shared intensity steps


def percentile_window(values: Sequence[np.ndarray], percentiles: tuple[float, float]) -> tuple[float, float]:
    """Robust (low, high) over all sampled frames, so that frames share one window."""
    total = sum(v.size for v in values)
    step = total // _PERCENTILE_SAMPLES + 1
    flat = np.concatenate([v.reshape(-1)[::step] for v in values])
    lo, hi = (float(x) for x in np.percentile(flat, percentiles))
    if hi <= lo:
        # Mostly-constant images (a segmentation mask, a blank border): the
        # percentiles collapse, the full range still shows the content.
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """VOI LUT function of PS3.3 C.11.2.1.2 mapped onto [0, 1]."""
    c, w = window.center, window.width
    x = values.astype(np.float64, copy=False)
    if window.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700, 700)))
    if window.function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w <= 1.0:  # LINEAR with the minimum width: a threshold
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def normalise_gray(
    source: str,
    values: Sequence[np.ndarray],
    *,
    windows: Sequence[Window | None] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    invert: bool = False,
) -> list[np.ndarray]:
    """Modality-unit frames -> (H, W, 1) float32 in [0, 1].

    Frames with a window use it; the others share one percentile window.
    """
    windows = list(windows) if windows is not None else [None] * len(values)
    for v in values:
        if not np.all(np.isfinite(v)):
            raise PreprocessError(source, "pixel data contains non-finite values (NaN or infinity)")
    unwindowed = [v for v, w in zip(values, windows) if w is None]
    lo_hi = percentile_window(unwindowed, percentiles) if unwindowed else (0.0, 1.0)
    out: list[np.ndarray] = []
    for v, w in zip(values, windows):
        if w is not None:
            y = apply_window(v, w)
        else:
            lo, hi = lo_hi
            if hi > lo:
                y = np.clip((v.astype(np.float64, copy=False) - lo) / (hi - lo), 0.0, 1.0)
            else:  # a constant image
                y = np.zeros(v.shape, dtype=np.float64)
        if invert:
            y = 1.0 - y
        out.append(y.astype(np.float32)[:, :, None])
    return out


def normalise_color(source: str, frames: Sequence[np.ndarray], max_value: float) -> list[np.ndarray]:
    """(H, W, 3) RGB or (H, W) grey frames of stored values in [0, max_value] ->
    (H, W, C) float32 in [0, 1], without windowing."""
    out = []
    for f in frames:
        if f.ndim == 2:
            f = f[:, :, None]
        if f.ndim != 3 or f.shape[2] not in (1, 3):
            raise PreprocessError(source, f"expected an RGB or grey frame, got an array of shape {f.shape}")
        y = f.astype(np.float64, copy=False) / float(max_value)
        if not np.all(np.isfinite(y)):
            raise PreprocessError(source, "pixel data contains non-finite values (NaN or infinity)")
        out.append(np.clip(y, 0.0, 1.0).astype(np.float32))
    return out


# --------------------------------------------------------------------------------- DICOM


def _int_value(ds: Dataset, keyword: str, source: str, default: int | None = None) -> int:
    try:
        raw = ds.get(keyword, None)
    except Exception as exc:  # an unparsable element value
        raise UnsupportedPixelDataError(source, f"unreadable {keyword}: {_one_line(exc)}") from exc
    if raw is None or raw == "":
        if default is None:
            raise UnsupportedPixelDataError(source, f"missing {keyword}")
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError) as exc:
        raise UnsupportedPixelDataError(source, f"invalid {keyword} {raw!r}") from exc
    return value


def _first_float(raw: Any) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, (list, tuple, MultiValue)):
        if len(raw) == 0:
            return None
        raw = raw[0]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """First item of a functional-group macro for a frame of an enhanced object
    (per-frame groups take precedence over shared ones)."""
    for group_kw, pick in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_kw)
        if not groups or pick >= len(groups):
            continue
        seq = groups[pick].get(keyword)
        if seq:
            return seq[0]
    return None


def _window_from(item: Dataset) -> Window | None:
    center = _first_float(item.get("WindowCenter"))
    width = _first_float(item.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in {"LINEAR", "LINEAR_EXACT", "SIGMOID"}:
        function = "LINEAR"
    # PS3.3 C.11.2.1.2: width >= 1 for LINEAR, > 0 otherwise; a bad width is
    # ignored (percentile fallback) rather than producing a black image.
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return Window(center, width, function)


def frame_window(ds: Dataset, index: int) -> Window | None:
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _window_from(ds)
    item = _functional_item(ds, index, "FrameVOILUTSequence")
    return _window_from(item) if item is not None else None


def _modality_values(arr: np.ndarray, ds: Dataset, index: int, is_float: bool) -> np.ndarray:
    if is_float:
        return arr.astype(np.float64, copy=False)
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        out = apply_modality_lut(arr, ds)
        return np.asarray(out, dtype=np.float64)
    item = _functional_item(ds, index, "PixelValueTransformationSequence")
    if item is not None:
        slope = _first_float(item.get("RescaleSlope"))
        intercept = _first_float(item.get("RescaleIntercept"))
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        return arr.astype(np.float64) * slope + intercept
    return arr.astype(np.float64)


def _voi_lut_values(values: np.ndarray, ds: Dataset, source: str) -> np.ndarray | None:
    """VOI LUT Sequence (a table rather than a window) mapped onto [0, 1], or None."""
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    try:
        bits = int(seq[0].LUTDescriptor[2])
        out = apply_voi(values, ds, index=0)
        return np.clip(np.asarray(out, dtype=np.float64) / float(2**bits - 1), 0.0, 1.0)
    except Exception as exc:
        logger.warning(
            "unusable VOI LUT Sequence, using the percentile window",
            extra={"source": source, "reason": _one_line(exc)},
        )
        return None


def _transfer_syntax(ds: Dataset, data: Any, source: str) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        return UID(str(ts))
    # No file meta (a dataset built in memory, a raw stream): native pixel data
    # can still be read with the encoding the dataset was parsed with.
    if isinstance(data, (bytes, bytearray)) and bytes(data[:4]) == _ITEM_TAG:
        raise UnsupportedPixelDataError(source, "no Transfer Syntax UID for encapsulated (compressed) pixel data")
    little = getattr(ds, "original_encoding", (None, None))[1]
    return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian


def _check_native_length(
    source: str, length: int, rows: int, columns: int, frames: int, samples: int, bits_allocated: int, photometric: str
) -> None:
    """Native pixel data must not hold a whole frame more than the header declares.

    pydicom only warns about excess data and decodes the leading bytes, so a header
    that understates BitsAllocated, Rows or Columns would be scored on misread pixels.
    Trailing padding shorter than a frame occurs in real files and is tolerated.
    Shorter data is left to the decoder, which names the shortfall.
    """
    if photometric == "YBR_FULL_422":  # subsampled: pydicom computes its own length
        return
    frame_bytes = -(-rows * columns * samples * bits_allocated // 8)
    expected = -(-rows * columns * frames * samples * bits_allocated // 8)
    if length - expected >= max(frame_bytes, 2):
        raise UnsupportedPixelDataError(
            source,
            f"pixel data is {length} bytes but the header ({rows}x{columns}x{frames}, "
            f"{samples} samples, {bits_allocated} bits allocated) declares {expected}: header and data disagree",
        )


def decode_dicom(
    ds: Dataset,
    source: str,
    *,
    max_frames: int,
    frame_rule: FrameRule,
    max_pixels: int,
    percentiles: tuple[float, float],
) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Sampled frames of a DICOM dataset as (H, W, C) float32 arrays in [0, 1]."""
    present = [(tag, kw) for tag, kw in _PIXEL_TAGS if tag in ds]
    if not present:
        raise NoPixelDataError(source, "no Pixel Data element")
    tag, keyword = present[0]
    try:
        data = ds[tag].value
    except Exception as exc:
        raise PreprocessError(source, f"cannot read {keyword}: {_one_line(exc)}") from exc
    if data is None or len(data) == 0:
        raise NoPixelDataError(source, f"{keyword} element is empty")
    is_float = keyword != "PixelData"

    rows = _int_value(ds, "Rows", source)
    columns = _int_value(ds, "Columns", source)
    samples = _int_value(ds, "SamplesPerPixel", source, default=1)
    frames = _int_value(ds, "NumberOfFrames", source, default=1)
    bits_allocated = _int_value(ds, "BitsAllocated", source)
    bits_stored = _int_value(ds, "BitsStored", source, default=bits_allocated)
    if rows <= 0 or columns <= 0:
        raise UnsupportedPixelDataError(source, f"image has {rows} rows and {columns} columns")
    if frames < 0:
        raise UnsupportedPixelDataError(source, f"invalid NumberOfFrames {frames}")
    frames = max(frames, 1)  # 0 is invalid but common; pydicom reads it as 1 as well
    allowed_bits = {32, 64} if is_float else {1, 8, 16, 32}
    if bits_allocated not in allowed_bits:
        raise UnsupportedPixelDataError(source, f"unsupported BitsAllocated {bits_allocated} for {keyword}")
    if not 1 <= bits_stored <= bits_allocated:
        raise UnsupportedPixelDataError(
            source, f"invalid BitsStored {bits_stored} with BitsAllocated {bits_allocated}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in _SUPPORTED_PI:
        raise UnsupportedPixelDataError(source, f"unsupported PhotometricInterpretation {photometric or '(missing)'}")
    expected_samples = 1 if photometric in _GRAY or photometric == "PALETTE COLOR" else 3
    if samples != expected_samples:
        raise UnsupportedPixelDataError(source, f"SamplesPerPixel {samples} with PhotometricInterpretation {photometric}")
    check_size(source, rows, columns, frames, samples, max_pixels)

    ts = _transfer_syntax(ds, data, source)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UnsupportedPixelDataError(source, f"transfer syntax {ts.name} ({ts}) is not supported") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "unknown"
        raise UnsupportedPixelDataError(source, f"no decoder plugin installed for {ts.name}; missing: {missing}")
    if not ts.is_compressed:
        _check_native_length(source, len(data), rows, columns, frames, samples, bits_allocated, photometric)
    try:
        opts = as_pixel_options(ds, number_of_frames=frames)
    except Exception as exc:
        raise UnsupportedPixelDataError(source, f"invalid image pixel header: {_one_line(exc)}") from exc

    indices = sample_frames(frames, max_frames, frame_rule)
    decoded: list[np.ndarray] = []
    out_photometric = photometric
    for index in indices:
        try:
            arr, meta = decoder.as_array(ds, index=index, validate=True, raw=False, **opts)
        except Exception as exc:
            text = _one_line(exc)
            reason = "pixel data truncated" if "less than expected" in text else "cannot decode pixel data"
            raise PreprocessError(source, f"{reason} (frame {index}, {ts.name}): {text}") from exc
        out_photometric = str(meta.get("photometric_interpretation", photometric)).strip().upper()
        decoded.append(arr)

    try:
        if out_photometric in _GRAY:
            values = [_modality_values(a, ds, i, is_float) for a, i in zip(decoded, indices)]
            windows = [frame_window(ds, i) for i in indices]
            if all(w is None for w in windows):
                mapped = [_voi_lut_values(v, ds, source) for v in values]
                if all(m is not None for m in mapped):
                    # The VOI LUT already maps onto [0, 1]; LINEAR_EXACT centred
                    # at 0.5 with width 1 is the identity there, so inversion and
                    # channel replication stay on the one shared path.
                    values = [m for m in mapped if m is not None]
                    windows = [_IDENTITY] * len(values)
            return indices, normalise_gray(
                source, values, windows=windows, percentiles=percentiles,
                invert=out_photometric == "MONOCHROME1",
            )
        if out_photometric == "PALETTE COLOR":
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            rgb = [apply_color_lut(a, ds) for a in decoded]
            return indices, normalise_color(source, rgb, 2**lut_bits - 1)
        if out_photometric in {"YBR_FULL", "YBR_FULL_422"}:
            decoded = [convert_color_space(a, "YBR_FULL", "RGB") for a in decoded]
            out_photometric = "RGB"
        if out_photometric == "RGB":
            return indices, normalise_color(source, decoded, 2 ** min(bits_stored, bits_allocated) - 1)
    except PreprocessError:
        raise
    except Exception as exc:
        raise PreprocessError(
            source, f"cannot convert {out_photometric} pixel data: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    raise UnsupportedPixelDataError(source, f"decoded PhotometricInterpretation {out_photometric} is not supported")


# --------------------------------------------------------------------------- image files


def decode_image(
    image: Any,
    source: str,
    *,
    max_frames: int,
    frame_rule: FrameRule,
    max_pixels: int,
    percentiles: tuple[float, float],
) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Sampled frames of an opened Pillow image as (H, W, C) float32 arrays in [0, 1].

    8-bit data (L, P, RGB, ...) is scaled by 255 without windowing, so the
    stored values reach the noise branch unchanged; deeper greyscale (16-bit,
    32-bit integer, float) has no fixed display range and takes the same
    percentile window as a DICOM image without VOI attributes.
    """
    width, height = image.size
    n_frames = int(getattr(image, "n_frames", 1) or 1)
    check_size(source, height, width, n_frames, len(image.getbands()), max_pixels)
    if width <= 0 or height <= 0:
        raise UnsupportedPixelDataError(source, f"image has {height} rows and {width} columns")
    indices = sample_frames(n_frames, max_frames, frame_rule)
    gray: list[np.ndarray] = []
    color: list[np.ndarray] = []
    color_max = 255.0
    for index in indices:
        try:
            image.seek(index)
            mode = image.mode
            if mode in {"1", "L", "LA", "La"}:
                gray_img = image.convert("L") if mode != "1" else image
                arr = np.asarray(gray_img)
                if mode == "1":
                    color.append(arr.astype(np.uint8))
                    color_max = 1.0
                else:
                    color.append(arr)
            elif mode.startswith("I") or mode == "F":
                gray.append(np.asarray(image).astype(np.float64))
            else:
                color.append(np.asarray(image.convert("RGB")))
        except Exception as exc:  # truncated or corrupt data surfaces on load
            raise PreprocessError(source, f"cannot decode image frame {index}: {_one_line(exc)}") from exc
    if gray and color:
        raise UnsupportedPixelDataError(source, "image mixes greyscale and colour frames")
    if gray:
        return indices, normalise_gray(source, gray, percentiles=percentiles)
    return indices, normalise_color(source, color, color_max)




# ------------------------------------------------------------------ a data set, decoded


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding needs of the preprocessing settings (``PreprocessConfig.decode_limits``)."""

    max_frames: int
    frame_rule: FrameRule
    max_pixels: int
    percentiles: tuple[float, float]

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``decode_dicom`` and ``decode_image``."""
        return {
            "max_frames": self.max_frames,
            "frame_rule": self.frame_rule,
            "max_pixels": self.max_pixels,
            "percentiles": self.percentiles,
        }


@dataclass(frozen=True)
class DecodedDicom:
    """A DICOM data set decoded to frames, before any resizing or cropping.

    Only numpy and plain values, so that it can be made in another process and sent back
    (``listener.decode_pool``): the model-side steps (``detector.preprocess.prepare_decoded``)
    then run where the model is.
    """

    source: str
    modality: str | None                # the data set's Modality as stored, None when absent
    sop_instance_uid: str | None
    frame_indices: tuple[int, ...]
    frames: list[np.ndarray]            # (H, W, C) float32 in [0, 1]


def decode_dataset(ds: Dataset, source: str | None, limits: DecodeLimits) -> DecodedDicom:
    """Decode ``ds`` to frames; ``source`` names it in errors (default ``"SOP <uid>"``).

    Raises only ``PreprocessError``: anything else that goes wrong is wrapped with its type.
    """
    try:
        uid_value = ds.get("SOPInstanceUID")
    except Exception:
        uid_value = None
    sop_uid = str(uid_value).strip() if uid_value else None
    source = source or f"SOP {sop_uid or 'unknown'}"
    try:
        indices, frames = decode_dicom(ds, source, **limits.as_kwargs())
        modality = ds.get("Modality")
        return DecodedDicom(
            source=source,
            modality=None if modality is None else str(modality),
            sop_instance_uid=sop_uid,
            frame_indices=indices,
            frames=frames,
        )
    except PreprocessError:
        raise
    except Exception as exc:  # the contract: no raw pydicom/numpy error leaves this module
        raise PreprocessError(source, f"unexpected {type(exc).__name__}: {_one_line(exc)}") from exc
