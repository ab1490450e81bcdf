"""The real images that ship with pydicom, as an extra real source.

Only pydicom's *local* test files are read (``pydicom.data.DATA_ROOT/test_files``);
``pydicom.data.get_testdata_files`` is avoided because it also tries to download
the pydicom-data repository, and nothing here may touch the network.

An image is taken when it decodes, its Modality is an acquisition modality
(``ACQUISITION_MODALITIES``: SEG, RTDOSE and modality-less or OT secondary-capture
test patterns are not acquired images), and it is at least ``min_size`` pixels in
both directions. Identical pixel data stored under several transfer syntaxes
count once. Multi-frame images give their middle frame; colour images their
luminance. Intensities: modality LUT, then the dataset's VOI window (else the
0.5-99.5 percentile window), MONOCHROME1 inverted, to [0, 1].
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.multival
from pydicom.pixels import apply_color_lut, apply_modality_lut

logger = logging.getLogger(__name__)

ACQUISITION_MODALITIES: frozenset[str] = frozenset(
    {"CT", "MR", "US", "CR", "DX", "MG", "NM", "PT", "XA", "RF", "IO", "PX", "OP", "XC"})


@dataclass(frozen=True)
class PydicomReal:
    name: str              # file name stem, made unique
    modality: str
    image: np.ndarray      # (H, W) float32 in [0, 1]
    source_path: Path


def testdata_root() -> Path:
    from pydicom.data.data_manager import DATA_ROOT

    return Path(DATA_ROOT) / "test_files"


def _to_unit(ds: pydicom.Dataset) -> np.ndarray:
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        pi = "RGB"
    if arr.ndim == 3:                       # colour: pydicom returns RGB; take luminance
        rgb = arr.astype(np.float64)
        scale = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else max(rgb.max(), 1.0)
        return np.clip((0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / scale, 0, 1
                       ).astype(np.float32)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # PS3.3 C.11.2.1.2.1 LINEAR window, first value of a multi-valued window, output scaled to [0, 1].
        first = lambda v: float(v[0]) if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else float(v)  # noqa: E731
        c, w = first(ds.WindowCenter), max(first(ds.WindowWidth), 1.0)
        out = np.clip((values - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)
    else:
        a, b = np.percentile(values, [0.5, 99.5])
        out = np.clip((values - a) / (b - a if b > a else 1.0), 0.0, 1.0)
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def iter_pydicom_reals(min_size: int = 128) -> Iterator[PydicomReal]:
    """Every qualifying pydicom test image, in sorted path order (deterministic)."""
    seen: set[str] = set()
    used_names: set[str] = set()
    for path in sorted(p for p in testdata_root().rglob("*") if p.is_file() and p.suffix != ".py"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
                if "PixelData" not in ds:
                    continue
                modality = str(ds.get("Modality", "") or "")
                if modality not in ACQUISITION_MODALITIES:
                    continue
                rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
                if min(rows, cols) < min_size:
                    continue
                image = _to_unit(ds)
        except Exception as exc:  # noqa: BLE001 - undecodable test files are expected (truncated, bad VR)
            logger.info("skipped pydicom test file", extra={"path": str(path), "reason": str(exc)[:200]})
            continue
        digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        if digest in seen or not np.all(np.isfinite(image)) or image.max() <= image.min():
            continue
        seen.add(digest)
        name = "pydicom_" + path.stem.replace(" ", "_")
        while name in used_names:
            name += "_"
        used_names.add(name)
        yield PydicomReal(name, modality, image, path)
