"""CT acquisition simulation: parallel-beam projection, photon statistics, filtered back-projection.

Physics modelled, in order:

1. **Object**: a random phantom (:mod:`.phantoms`) in Hounsfield units with a
   low-amplitude random texture per tissue, rendered at twice the output
   resolution. HU are converted to linear attenuation at an effective energy of
   about 70 keV: ``mu = mu_water * (1 + HU / 1000)`` with ``mu_water = 0.0193 /mm``.
2. **Forward projection** (Radon transform): for each view angle ``theta`` every
   fine pixel is splatted with linear weights onto the detector coordinate
   ``t = x cos(theta) + y sin(theta)`` (pixel-driven projector), giving line
   integrals ``p = integral of mu dl`` (dimensionless).
3. **Detector aperture**: each detector element integrates the *intensity*
   ``exp(-p)`` over two fine bins, so partial-volume at edges is non-linear, as in
   a real detector (the source of exponential edge-gradient effects).
4. **Quantum noise**: transmitted photon counts are Poisson with mean
   ``I0 * exp(-p)``; ``I0`` (the unattenuated counts per detector element and
   view) sets the dose; a small Gaussian electronic-noise term is added and counts
   are floored at 1 before the log (photon starvation behind dense bone shows up
   as streaks, as in real scans).
5. **Reconstruction**: filtered back-projection with the discrete Ram-Lak ramp
   (Kak & Slaney), apodised by a random reconstruction kernel (Ram-Lak /
   Shepp-Logan / Hann), then pixel-driven linear-interpolation back-projection.
   Outside the reconstruction circle the scanner fill value -1024 HU is used.
"""

from __future__ import annotations

import numpy as np

from .common import SimulatedImage, Window
from .phantoms import Tissue, property_map, random_phantom, smooth_field

MU_WATER_PER_MM = 0.0193
FILL_HU = -1024.0
DISPLAY_WINDOW = Window(center=50.0, width=700.0)   # body: [-300, 400] HU: fat, soft tissue, contrast; air black
BRAIN_WINDOW = Window(center=40.0, width=120.0)     # head: grey/white matter contrast of ~12 HU stays visible

# Mean HU and per-image jitter (std) of each tissue.
HU_TABLE: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 0.0),
    Tissue.FAT: (-100.0, 15.0),
    Tissue.MUSCLE: (45.0, 8.0),
    Tissue.LIVER: (60.0, 15.0),
    Tissue.KIDNEY: (35.0, 20.0),
    Tissue.FLUID: (5.0, 5.0),
    Tissue.BONE: (1100.0, 200.0),
    Tissue.MARROW: (250.0, 60.0),
    Tissue.LUNG: (-850.0, 40.0),
    Tissue.LESION: (20.0, 25.0),
    Tissue.BLOOD: (45.0, 10.0),
    Tissue.GREY: (40.0, 4.0),
    Tissue.WHITE: (28.0, 4.0),
}


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    return np.maximum(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    return 1000.0 * (mu - MU_WATER_PER_MM) / MU_WATER_PER_MM


def phantom_hu(rng: np.random.Generator, labels: np.ndarray, contrast: bool) -> np.ndarray:
    """HU map of a label map: tissue means with jitter, optional iodine contrast, smooth texture."""
    values = {t: rng.normal(m, s) for t, (m, s) in HU_TABLE.items()}
    if contrast:  # portal-venous phase: vessels and parenchyma enhance
        values[Tissue.BLOOD] += rng.uniform(100.0, 250.0)
        values[Tissue.LIVER] += rng.uniform(30.0, 60.0)
        values[Tissue.KIDNEY] += rng.uniform(80.0, 150.0)
    hu = property_map(labels, values)
    texture = smooth_field(rng, labels.shape, 0.02) * rng.uniform(4.0, 12.0)
    body = labels != Tissue.AIR
    hu = hu + np.where(body & (labels != Tissue.LUNG), texture, 0.0)
    return hu


def radon(mu: np.ndarray, angles: np.ndarray, pixel_mm: float, chunk: int = 16) -> np.ndarray:
    """Parallel-beam line integrals (A, N) of an (N, N) attenuation map (per mm) by pixel-driven splatting.

    The detector has N bins of one pixel width centred on the rotation axis.
    """
    n = mu.shape[0]
    c = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    xs, ys, vals = xx.ravel(), yy.ravel(), mu.ravel()
    keep = vals > 0
    xs, ys, vals = xs[keep], ys[keep], vals[keep]
    out = np.zeros((len(angles), n), dtype=np.float64)
    for start in range(0, len(angles), chunk):
        th = angles[start:start + chunk]
        t = np.cos(th)[:, None] * xs[None, :] + np.sin(th)[:, None] * ys[None, :] + (n - 1) / 2.0
        i0 = np.floor(t).astype(np.int64)
        w1 = t - i0
        stride = n + 3                                   # guard bins on each side of every view
        rows = np.arange(len(th))[:, None] * stride
        idx0 = np.clip(i0, -1, n) + 1 + rows
        size = len(th) * stride
        acc = np.bincount(idx0.ravel(), weights=(vals * (1.0 - w1)).ravel(), minlength=size)
        acc += np.bincount((idx0 + 1).ravel(), weights=(vals * w1).ravel(), minlength=size)
        for k in range(len(th)):
            out[start + k] = acc[k * stride + 1: k * stride + 1 + n]
    return out * pixel_mm


def ramp_filter(n_det: int, kernel: str = "ram-lak") -> np.ndarray:
    """Frequency response (length padded n) of the discrete ramp filter, apodised by ``kernel``."""
    size = int(2 ** np.ceil(np.log2(2 * n_det)))
    k = np.arange(size)
    k = np.where(k > size // 2, k - size, k)
    h = np.zeros(size)
    h[0] = 0.25
    odd = (k % 2) == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    H = np.real(np.fft.fft(h))
    f = np.abs(np.fft.fftfreq(size))           # cycles / sample, 0..0.5
    if kernel == "shepp-logan":
        H = H * np.sinc(f)
    elif kernel == "hann":
        H = H * 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    elif kernel != "ram-lak":
        raise ValueError(f"unknown reconstruction kernel {kernel!r}")
    return H


def fbp(sinogram: np.ndarray, angles: np.ndarray, n: int, det_mm: float, kernel: str = "ram-lak") -> np.ndarray:
    """Filtered back-projection of a parallel-beam sinogram (A, D) onto an (n, n) grid of pixel det_mm.

    Returns attenuation per mm.
    """
    a, d = sinogram.shape
    H = ramp_filter(d, kernel)
    padded = np.zeros((a, len(H)))
    padded[:, :d] = sinogram
    q = np.real(np.fft.ifft(np.fft.fft(padded, axis=1) * H[None, :], axis=1))[:, :d]
    c = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    xs, ys = xx.ravel(), yy.ravel()
    img = np.zeros(n * n)
    for k, th in enumerate(angles):
        t = np.cos(th) * xs + np.sin(th) * ys + (d - 1) / 2.0
        img += np.interp(t, np.arange(d), q[k], left=0.0, right=0.0)
    return (img * np.pi / a / det_mm).reshape(n, n)


def simulate_ct(rng: np.random.Generator, size: int = 128, *, fov_mm: float | None = None,
                n_views: int | None = None, i0: float | None = None, kernel: str | None = None,
                anatomy: str | None = None) -> SimulatedImage:
    """One axial CT slice in HU (``raw``) and its soft-tissue window (``image``)."""
    oversample = 2
    phantom = random_phantom(rng, size, oversample, anatomy)
    fov_mm = float(fov_mm if fov_mm is not None else (rng.uniform(220, 260) if phantom.anatomy == "head"
                                                       else rng.uniform(360, 440)))
    contrast = bool(phantom.anatomy != "head" and rng.uniform() < 0.5)
    hu_fine = phantom_hu(rng, phantom.labels, contrast)
    n_fine = size * oversample
    fine_mm = fov_mm / n_fine
    n_views = int(n_views if n_views is not None else 2 * size)
    angles = np.arange(n_views) * np.pi / n_views
    # Line integrals on fine detector bins, then each real detector element integrates intensity.
    p_fine = radon(hu_to_mu(hu_fine), angles, fine_mm)
    transmitted = np.exp(-p_fine).reshape(n_views, size, oversample).mean(axis=2)
    # Head protocols use a higher dose (and smoother kernels) so that ~10 HU grey/white contrast survives.
    head = phantom.anatomy == "head"
    i0 = float(i0 if i0 is not None else 10 ** (rng.uniform(5.5, 6.2) if head else rng.uniform(4.0, 5.3)))
    counts = rng.poisson(i0 * transmitted).astype(np.float64)
    counts += rng.normal(0.0, 2.0, counts.shape)          # electronic noise (counts)
    p = -np.log(np.maximum(counts, 1.0) / i0)
    kernel = kernel if kernel is not None else str(rng.choice(["shepp-logan", "hann"] if head
                                                              else ["ram-lak", "shepp-logan", "hann"]))
    mu = fbp(p, angles, size, fov_mm / size, kernel)
    hu = mu_to_hu(mu)
    c = np.arange(size) - (size - 1) / 2.0
    outside = (c[:, None] ** 2 + c[None, :] ** 2) > (size / 2.0) ** 2
    hu[outside] = FILL_HU
    hu = hu.astype(np.float32)
    window = BRAIN_WINDOW if phantom.anatomy == "head" else DISPLAY_WINDOW
    return SimulatedImage("CT", window.apply(hu), hu, window,
                          {"anatomy": phantom.anatomy, "fov_mm": fov_mm, "n_views": n_views, "i0": i0,
                           "kernel": kernel, "contrast": contrast})
