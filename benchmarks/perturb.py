"""Perturbed copies of a benchmark split, for the robustness part of the results.

    python -m benchmarks.perturb --src DIR --out DIR --kind jpeg90|jpeg75|down50|noise [--sigma 0.02] [--seed 0]

The folder layout ``DIR/<modality>/<source>/<files>`` is kept, so labels, modalities
and generators stay what they were. Every image file (PNG, JPEG, TIFF; 8- or 16-bit
greyscale or RGB) is decoded to greyscale in [0, 1] and then:

* ``jpeg90`` / ``jpeg75``: re-compressed as baseline JPEG at quality 90 / 75 (Pillow,
  4:2:0 irrelevant for greyscale), written as ``.jpg``;
* ``down50``: downscaled to half size in each direction with Pillow's antialiased bicubic
  filter, written as 8-bit PNG;
* ``noise``: additive white Gaussian noise of standard deviation ``--sigma`` (default 0.02
  of the full range, about 5 grey levels of 255), clipped to [0, 1], written as 8-bit PNG.
  The noise of each file comes from its own generator, seeded from ``--seed`` and the file's
  relative path, so the output is deterministic and independent of file order.

DICOM files are refused (the benchmark's default format is PNG). ``OUT/perturb.json``
records the kind, its parameters and the number of files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("jpeg90", "jpeg75", "down50", "noise")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_SIGMA = 0.02
MANIFEST = "perturb.json"


def read_grey(path: Path) -> np.ndarray:
    """Greyscale image as float64 in [0, 1] (8- and 16-bit; colour is converted to luminance)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float64)
            return np.clip(a / (65535.0 if a.max() > 255 or im.mode.startswith("I;16") else 255.0), 0.0, 1.0)
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def _to_u8(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), mode="L")


def _file_rng(seed: int, rel: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{rel}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def perturb_image(img: np.ndarray, kind: str, *, sigma: float = DEFAULT_SIGMA,
                  rng: np.random.Generator | None = None) -> tuple[Image.Image, dict[str, object]]:
    """The perturbed image and Pillow save options (``format`` included)."""
    if kind in ("jpeg90", "jpeg75"):
        return _to_u8(img), {"format": "JPEG", "quality": int(kind[4:]), "subsampling": 0, "optimize": False}
    if kind == "down50":
        im = _to_u8(img) if img.dtype != np.uint8 else Image.fromarray(img)
        h, w = img.shape
        return im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC), {"format": "PNG"}
    if kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        return _to_u8(np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)), {"format": "PNG"}
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")


def perturb_tree(src: Path, out: Path, kind: str, *, sigma: float = DEFAULT_SIGMA, seed: int = 0) -> dict[str, object]:
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(KINDS)}")
    src, out = Path(src), Path(out)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.relative_to(src).parts[0] != MANIFEST and len(p.relative_to(src).parts) >= 3)
    n = 0
    for f in files:
        rel = f.relative_to(src)
        if f.suffix.lower() == ".dcm":
            raise ValueError(f"{f}: DICOM is not supported by benchmarks.perturb; generate the split as PNG")
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        img, opts = perturb_image(read_grey(f), kind, sigma=sigma, rng=_file_rng(seed, rel.as_posix()))
        fmt = opts.pop("format")
        dest = out / rel.with_suffix(".jpg" if fmt == "JPEG" else ".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        img.save(dest, format=fmt, **opts)
        n += 1
    params: dict[str, object] = {"kind": kind, "src": str(src), "files": n}
    if kind.startswith("jpeg"):
        params["quality"] = int(kind[4:])
    elif kind == "down50":
        params.update(scale=0.5, filter="bicubic (Pillow, antialiased)")
    else:
        params.update(sigma=sigma, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return params


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perturb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="noise standard deviation, fraction of range")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = perturb_tree(a.src, a.out, a.kind, sigma=a.sigma, seed=a.seed)
    print(f"{a.kind}: {info['files']} file(s) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
