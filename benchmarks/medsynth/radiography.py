"""Projection radiography (DX / CR) simulation: attenuation through a 3-D phantom, scatter, quantum noise.

Physics modelled, in order:

1. **3-D object**: a PA chest or an extremity built from analytic solids whose
   path lengths along the beam are known in closed form: ellipsoids
   (``t = 2c sqrt(1 - u^2/a^2 - v^2/b^2)``: trunk, lungs, heart) and cylinders / tubes
   along a curve (``t = 2 sqrt(r^2 - d^2)`` with d the distance to the axis: spine,
   ribs, clavicles, long bones with cortex and marrow cavity).
2. **Beer-Lambert attenuation** at an effective energy of ~60 keV: the line
   integral ``L = sum_i mu_i t_i`` and primary fluence ``I0 exp(-L)``; lungs
   replace soft tissue by aerated tissue (their mu difference is subtracted).
3. **Heel effect**: a smooth gradient of the incident fluence along the anode-cathode axis.
4. **Scatter**: scattered radiation is a low-frequency copy of the primary,
   modelled as the primary convolved with a wide Gaussian and scaled by a
   scatter-to-primary ratio (lower when an anti-scatter grid is used); it reduces
   contrast without adding detail.
5. **Quantum noise**: detected quanta are Poisson with mean proportional to
   primary + scatter (``photons`` per pixel sets the dose).
6. **Detector**: blur of the converter (Gaussian MTF; wider for CR storage
   phosphor than for DX flat panel), log transform (bones bright, MONOCHROME2
   presentation), and the usual "for presentation" processing: unsharp-mask edge
   enhancement, then a percentile window.
"""

from __future__ import annotations

import numpy as np

from .common import SimulatedImage, percentile_window
from .phantoms import grid, smooth_field

# Linear attenuation at ~60 keV, per mm.
MU_SOFT = 0.0205
MU_FAT = 0.0180
MU_LUNG = 0.0055
MU_BONE = 0.0560
MU_MARROW = 0.0230


def ellipsoid_thickness(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, b: float, a: float,
                        depth: float, theta: float = 0.0) -> np.ndarray:
    """Chord length of an ellipsoid (semi-axes a (x), b (y), depth/2 along the beam) through each pixel."""
    c, s = np.cos(theta), np.sin(theta)
    u = c * (xx - cx) + s * (yy - cy)
    v = -s * (xx - cx) + c * (yy - cy)
    r2 = 1.0 - (u / a) ** 2 - (v / b) ** 2
    return depth * np.sqrt(np.clip(r2, 0.0, None))


def tube_thickness(dist: np.ndarray, radius: float) -> np.ndarray:
    """Chord length of a cylinder of ``radius`` at distance ``dist`` from its axis (same units)."""
    return 2.0 * np.sqrt(np.clip(radius ** 2 - dist ** 2, 0.0, None))


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur by FFT with reflective padding (no wrap-around from the opposite edge)."""
    if sigma_px <= 0:
        return img
    pad = int(min(3 * sigma_px + 1, img.shape[0] - 1))
    p = np.pad(img, pad, mode="reflect")
    fy = np.fft.fftfreq(p.shape[0])[:, None]
    fx = np.fft.fftfreq(p.shape[1])[None, :]
    tf = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy ** 2 + fx ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(p) * tf))
    return out[pad:pad + img.shape[0], pad:pad + img.shape[1]]


def _chest(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, mm: float) -> np.ndarray:
    """Line integral of mu (dimensionless) of a PA chest; coordinates in [-1, 1], mm per unit ``mm``."""
    depth = rng.uniform(180.0, 280.0)                      # AP thickness, mm
    w = rng.uniform(0.8, 0.95)
    trunk = ellipsoid_thickness(yy, xx, 0.25, 0.0, 1.4, w, depth)
    fat = ellipsoid_thickness(yy, xx, 0.25, 0.0, 1.4, w, depth) - ellipsoid_thickness(
        yy, xx, 0.25, 0.0, 1.4, w - 0.06, depth - 30.0)
    L = MU_SOFT * trunk + (MU_FAT - MU_SOFT) * fat
    lungs = np.zeros_like(yy)
    for s in (-1.0, 1.0):
        lungs += ellipsoid_thickness(yy, xx, rng.uniform(-0.15, 0.0), s * rng.uniform(0.35, 0.45),
                                     rng.uniform(0.6, 0.75), rng.uniform(0.25, 0.33), depth * rng.uniform(0.6, 0.75),
                                     s * rng.uniform(-0.15, 0.05))
    heart = ellipsoid_thickness(yy, xx, rng.uniform(0.15, 0.3), rng.uniform(-0.05, 0.12), rng.uniform(0.28, 0.36),
                                rng.uniform(0.25, 0.33), depth * 0.55, rng.uniform(-0.5, -0.2))
    lungs = np.clip(lungs - heart, 0.0, None)
    L += (MU_LUNG - MU_SOFT) * lungs
    # Lung vessels: faint soft-tissue texture inside the lungs.
    L += MU_SOFT * 8.0 * np.clip(smooth_field(rng, yy.shape, 0.012), 0, None) * (lungs > 0)
    # Spine: vertebral column along y, cortex + marrow.
    sx = rng.uniform(-0.03, 0.03)
    dist = np.abs(xx - sx) * mm
    r = rng.uniform(18.0, 24.0)
    L += MU_BONE * tube_thickness(dist, r) + (MU_MARROW - MU_BONE) * tube_thickness(dist, r * 0.8)
    # Ribs: tubes along parabolic arcs, posterior ribs on both sides.
    n_ribs = int(rng.integers(9, 12))
    y0 = rng.uniform(-0.85, -0.7)
    spacing = rng.uniform(0.14, 0.18)
    rib_r = rng.uniform(4.0, 6.0)
    for k in range(n_ribs):
        for s in (-1.0, 1.0):
            yc = y0 + k * spacing
            curve = yc + rng.uniform(0.18, 0.3) * (np.abs(xx - sx) / 0.8) ** 2 - 0.05
            d = np.abs(yy - curve) * mm
            span = (np.sign(xx - sx) == s) & (np.abs(xx - sx) < rng.uniform(0.75, 0.9)) & (np.abs(xx - sx) > 0.05)
            t = tube_thickness(d, rib_r) * span
            L += MU_BONE * 0.6 * t                        # thin cortex: average density below cortical
    # Clavicles.
    for s in (-1.0, 1.0):
        d = np.abs(yy - rng.uniform(-0.8, -0.7) - 0.1 * np.abs(xx)) * mm
        span = (np.sign(xx) == s) & (np.abs(xx) < 0.7) & (np.abs(xx) > 0.08)
        L += MU_BONE * 0.8 * tube_thickness(d, rng.uniform(6.0, 8.0)) * span
    return L


def _extremity(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, mm: float) -> np.ndarray:
    """Line integral of a forearm / lower leg: soft-tissue cylinder with two long bones."""
    th = rng.uniform(-0.3, 0.3)
    c, s = np.cos(th), np.sin(th)
    u = c * xx + s * yy                                     # across the limb
    limb_r = rng.uniform(0.45, 0.7)
    L = MU_SOFT * tube_thickness(np.abs(u - rng.uniform(-0.1, 0.1)) * mm, limb_r * mm)
    v = -s * xx + c * yy                                    # along the limb
    for k, off in enumerate((-1.0, 1.0)):
        r = rng.uniform(0.09, 0.16) * (1.3 if k == 0 else 1.0)
        centre = off * rng.uniform(0.18, 0.28) + 0.04 * np.sin(v * rng.uniform(1, 3))
        d = np.abs(u - centre) * mm
        r_mm = r * mm * (1.0 + 0.25 * np.clip(np.abs(v) - 0.6, 0, None))   # metaphyseal flare
        cortex = rng.uniform(0.25, 0.4)
        L += MU_BONE * tube_thickness(d, r_mm) + (MU_MARROW - MU_BONE) * tube_thickness(d, r_mm * (1 - cortex))
    return L


def simulate_radiograph(rng: np.random.Generator, size: int = 128, *, detector: str = "DX",
                        photons: float | None = None, anatomy: str | None = None) -> SimulatedImage:
    """One projection radiograph. ``raw`` is the log-attenuation image ``-ln(I / I0)``."""
    if detector not in ("DX", "CR"):
        raise ValueError(f"detector must be 'DX' or 'CR', got {detector!r}")
    oversample = 2
    n = size * oversample
    yy, xx = grid(n)
    anatomy = anatomy or ("chest" if rng.uniform() < 0.6 else "extremity")
    fov_mm = rng.uniform(380.0, 430.0) if anatomy == "chest" else rng.uniform(200.0, 260.0)
    mm = fov_mm / 2.0                                       # mm per normalised unit
    if anatomy == "chest":
        L = _chest(rng, yy, xx, mm)
    elif anatomy == "extremity":
        L = _extremity(rng, yy, xx, mm)
    else:
        raise ValueError(f"unknown radiography anatomy {anatomy!r}")
    heel = 1.0 + rng.uniform(0.03, 0.12) * (yy if rng.uniform() < 0.5 else xx)
    primary = heel * np.exp(-L)
    # The detector pixel integrates fluence over its area.
    primary = primary.reshape(size, oversample, size, oversample).mean(axis=(1, 3))
    grid_used = bool(anatomy == "chest" and rng.uniform() < 0.7)
    spr = rng.uniform(0.2, 0.5) if grid_used else rng.uniform(0.6, 1.5)
    scatter = gaussian_blur(primary, rng.uniform(0.12, 0.25) * size) * spr
    photons = float(photons if photons is not None else 10 ** rng.uniform(2.7, 3.7))
    quanta = rng.poisson(photons * (primary + scatter)).astype(np.float64)
    mtf_sigma = rng.uniform(0.4, 0.7) if detector == "DX" else rng.uniform(0.8, 1.3)
    signal = gaussian_blur(quanta, mtf_sigma) / photons
    log_img = -np.log(np.maximum(signal, 0.5 / photons))
    # "For presentation" processing: unsharp masking boosts edges, as vendor software does.
    amount = rng.uniform(0.3, 1.0)
    processed = log_img + amount * (log_img - gaussian_blur(log_img, rng.uniform(3.0, 8.0)))
    raw = processed.astype(np.float32)
    window = percentile_window(raw, 0.5, 99.8)
    return SimulatedImage(detector, window.apply(raw), raw, window,
                          {"anatomy": anatomy, "fov_mm": fov_mm, "photons": photons, "scatter_to_primary": spr,
                           "grid": grid_used, "mtf_sigma_px": mtf_sigma, "unsharp_amount": amount})
