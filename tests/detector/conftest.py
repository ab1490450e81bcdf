"""Shared fixtures for detector tests: a synthetic data set with a planted generator trace, tiny bundles.

The synthetic images are smooth random structures (Gaussian blobs on a
low-frequency background) with pixel noise: the "real" ones. A "fake" is the same
kind of image produced at half resolution (structure and noise) and brought to
full size by a fixed random transposed convolution (kernel 4, stride 2), the
upsampling layer of many generators, which leaves a periodic checkerboard trace
in the high frequencies. Each generator name gets its own kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NOISE_SIGMA = 0.03


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Every detector test runs single-threaded (``tests/conftest.py``)."""


def _generator_kernel(name: str) -> np.ndarray:
    """(4, 4) transposed-convolution kernel: bilinear upsampling plus a fixed random perturbation,
    each of the four output phases normalised to sum 1 (keeps brightness, leaves the checkerboard)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    base = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25])
    k = base + 0.35 * rng.standard_normal((4, 4))
    # Phase (a, b) of the output uses kernel rows a, a+2 and columns b, b+2.
    for a in range(2):
        for b in range(2):
            k[a::2, b::2] /= k[a::2, b::2].sum()
    return k


def transposed_conv_upsample(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2x upsampling as ConvTranspose2d(1, 1, kernel_size=4, stride=2, padding=1) with a fixed kernel."""
    conv = torch.nn.ConvTranspose2d(1, 1, kernel_size=4, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel).view(1, 1, 4, 4))
        t = torch.from_numpy(np.pad(x, 1, mode="reflect")).float()[None, None]
        y = conv(t)[0, 0].numpy()
    return y[2:-2, 2:-2]


def smooth_structure(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.zeros((size, size))
    for _ in range(rng.integers(4, 9)):
        cy, cx = rng.uniform(0, 1, 2)
        sigma = rng.uniform(0.05, 0.25)
        img += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    img += rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy
    img -= img.min()
    img /= max(img.max(), 1e-9)
    return 0.15 + 0.7 * img


def real_image(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.clip(smooth_structure(rng, size) + NOISE_SIGMA * rng.standard_normal((size, size)), 0, 1)


def fake_image(rng: np.random.Generator, size: int, generator: str) -> np.ndarray:
    half = smooth_structure(rng, size // 2) + NOISE_SIGMA * rng.standard_normal((size // 2, size // 2))
    return np.clip(transposed_conv_upsample(half, _generator_kernel(generator)), 0, 1)


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(path)


def write_dicom(path: Path, img: np.ndarray, modality: str = "CT") -> None:
    """A 12-bit CT-like single-frame DICOM file (no VOI window: the percentile window applies, as for PNG)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "SYNTH"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.round(img * 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_trace_dataset(
    root: Path,
    *,
    n_real: int,
    n_fake: int,
    size: int = 64,
    seed: int = 0,
    modality: str = "CT",
    generators: Sequence[str] = ("tconv",),
    n_dicom: int = 0,
) -> Path:
    """``root/<modality>/real/*.png`` and ``root/<modality>/<generator>/*.png`` (``n_fake`` per generator);
    the first ``n_dicom`` images of each source are written as DICOM instead."""
    rng = np.random.default_rng(seed)
    for i in range(n_real):
        img = real_image(rng, size)
        d = root / modality / "real"
        write_dicom(d / f"r{i:04d}.dcm", img, modality) if i < n_dicom else write_png(d / f"r{i:04d}.png", img)
    for gen in generators:
        for i in range(n_fake):
            img = fake_image(rng, size, gen)
            d = root / modality / gen
            write_dicom(d / f"f{i:04d}.dcm", img, modality) if i < n_dicom else write_png(d / f"f{i:04d}.png", img)
    return root


@pytest.fixture()
def trace_dataset() -> Callable[..., Path]:
    """The data set factory: ``trace_dataset(root, n_real=..., n_fake=..., ...)``."""
    return make_trace_dataset


@pytest.fixture()
def tiny_bundle_factory(tmp_path: Path) -> Callable[..., Path]:
    """Saves an untrained ``dski-tiny`` model (seeded) as a bundle: ``factory(path=None, **save_kwargs)``."""
    from detector.bundle import RetrievalSettings, save_bundle
    from detector.methods import build_model
    from detector.preprocess import PreprocessConfig
    from detector.spec import ModelSpec

    def factory(path: Path | None = None, *, seed: int = 0, spec: ModelSpec | None = None, **kwargs) -> Path:
        spec = spec or ModelSpec()
        torch.manual_seed(seed)
        model = build_model(spec)
        # Open the noise gates a little, so the untrained bundle exercises the whole network.
        path = path or tmp_path / "bundle"
        cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
        kwargs.setdefault("name", "dski-test")
        kwargs.setdefault("version", "0.1.0")
        kwargs.setdefault("threshold", 0.5)
        kwargs.setdefault("retrieval", RetrievalSettings(k=4, lam=0.3, temperature=0.1))
        save_bundle(path, model, spec, cfg, **kwargs)
        return path

    return factory
