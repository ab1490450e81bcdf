"""MR acquisition simulation: spin-echo contrast, coil sensitivity, finite k-space sampling, Rician noise.

Physics modelled, in order:

1. **Tissue contrast**: each tissue gets proton density PD, T1 and T2 (1.5 T
   literature values, jittered per image, with a smooth multiplicative texture).
   The spin-echo signal is ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)``; TR/TE are
   drawn for a T1-, T2- or PD-weighted protocol. Cortical bone and air give no
   signal (very short T2*, no protons).
2. **Receive coil**: a smooth complex sensitivity (magnitude bias field plus slowly
   varying phase) multiplies the magnetisation.
3. **k-space sampling**: the object is rendered at twice the output resolution and
   Fourier transformed; only the central ``size x size`` k-space samples are kept,
   which is what a scanner with that matrix measures (truncation gives real
   Gibbs ringing at edges), tapered by a random raw-data apodisation filter as
   scanners do. Optionally partial Fourier: the last phase-encode lines
   of one half are not acquired and are zero-filled (blurring along the phase axis).
4. **Thermal noise**: i.i.d. complex Gaussian noise is added to every measured
   k-space sample.
5. **Reconstruction**: inverse FFT and magnitude. The magnitude of a complex
   Gaussian is Rician: in the background (no signal) it is Rayleigh distributed,
   so the image is non-negative with a noise floor of mean ``sigma * sqrt(pi/2)``.
"""

from __future__ import annotations

import numpy as np

from .common import SimulatedImage, percentile_window
from .phantoms import Tissue, property_map, random_phantom, smooth_field

# Tissue: (PD, T1 ms, T2 ms) at 1.5 T.
TISSUE_MR: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (0.0, 1000.0, 1.0),
    Tissue.FAT: (0.95, 260.0, 85.0),
    Tissue.MUSCLE: (0.75, 870.0, 47.0),
    Tissue.LIVER: (0.72, 490.0, 43.0),
    Tissue.KIDNEY: (0.82, 650.0, 58.0),
    Tissue.FLUID: (1.0, 3600.0, 1500.0),
    Tissue.BONE: (0.05, 1000.0, 1.0),
    Tissue.MARROW: (0.9, 550.0, 50.0),
    Tissue.LUNG: (0.08, 1200.0, 25.0),
    Tissue.LESION: (0.85, 1100.0, 110.0),
    Tissue.BLOOD: (0.85, 1400.0, 180.0),    # slow flow; fast flow would be a flow void
    Tissue.GREY: (0.82, 950.0, 100.0),
    Tissue.WHITE: (0.7, 600.0, 80.0),
}

PROTOCOLS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # name: ((TR min, max) ms, (TE min, max) ms)
    "T1w": ((400.0, 700.0), (8.0, 20.0)),
    "T2w": ((3000.0, 6000.0), (80.0, 120.0)),
    "PDw": ((2000.0, 4000.0), (10.0, 30.0)),
}


def spin_echo_signal(pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr: float, te: float) -> np.ndarray:
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def centred_fft2(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x), norm="ortho"))


def centred_ifft2(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k), norm="ortho"))


def crop_kspace(k: np.ndarray, size: int) -> np.ndarray:
    """Central size x size samples of a centred k-space, rescaled so image intensities are preserved."""
    n = k.shape[0]
    s = (n - size) // 2
    return k[s:s + size, s:s + size] * (size / n)


def simulate_mr(rng: np.random.Generator, size: int = 128, *, protocol: str | None = None,
                snr: float | None = None, partial_fourier: float | None = None,
                anatomy: str | None = None) -> SimulatedImage:
    """One MR magnitude image (``raw``, arbitrary units, ~1000 for PD=1) and its percentile window."""
    oversample = 2
    phantom = random_phantom(rng, size, oversample, anatomy)
    labels = phantom.labels
    protocol = protocol or str(rng.choice(list(PROTOCOLS)))
    (tr_lo, tr_hi), (te_lo, te_hi) = PROTOCOLS[protocol]
    tr, te = float(rng.uniform(tr_lo, tr_hi)), float(rng.uniform(te_lo, te_hi))
    jitter = {t: (pd * rng.uniform(0.93, 1.07), t1 * rng.uniform(0.9, 1.1), t2 * rng.uniform(0.9, 1.1))
              for t, (pd, t1, t2) in TISSUE_MR.items()}
    pd = property_map(labels, {t: v[0] for t, v in jitter.items()})
    t1 = property_map(labels, {t: v[1] for t, v in jitter.items()}, 1000.0)
    t2 = property_map(labels, {t: v[2] for t, v in jitter.items()}, 1.0)
    m = spin_echo_signal(pd, t1, t2, tr, te)
    m = m * (1.0 + rng.uniform(0.02, 0.06) * smooth_field(rng, labels.shape, 0.015))
    # Receive coil: smooth magnitude bias and phase.
    bias = np.exp(rng.uniform(0.1, 0.35) * smooth_field(rng, labels.shape, 0.4))
    phase = rng.uniform(0.5, 2.0) * smooth_field(rng, labels.shape, 0.5)
    obj = 1000.0 * m * bias * np.exp(1j * phase)
    k = crop_kspace(centred_fft2(obj), size)
    # Thermal noise on every measured sample, level from a target SNR on the bright tissue signal.
    # With the orthonormal FFT the image-domain std per channel equals the k-space std.
    snr = float(snr if snr is not None else rng.uniform(15.0, 60.0))
    sigma = float(np.percentile(np.abs(obj), 95)) / snr
    k = k + rng.normal(0.0, sigma, k.shape) + 1j * rng.normal(0.0, sigma, k.shape)
    # Vendor raw-data filter: a Tukey-like apodisation of the outer k-space tames Gibbs ringing
    # (and correlates the noise, as on a real scanner).
    kr = np.abs(np.arange(size) - size / 2.0) / (size / 2.0)
    taper_start = rng.uniform(0.5, 0.9)
    taper = np.where(kr < taper_start, 1.0,
                     0.5 * (1.0 + np.cos(np.pi * np.clip((kr - taper_start) / (1.0 - taper_start), 0, 1))))
    taper = np.maximum(taper, rng.uniform(0.0, 0.3))
    weights = np.outer(taper, taper)
    pf = float(partial_fourier if partial_fourier is not None else
               (1.0 if rng.uniform() < 0.6 else rng.uniform(0.7, 0.9)))
    if pf < 1.0:
        weights[int(round(size * pf)):, :] = 0.0   # unacquired phase-encode lines, zero-filled
    img = np.abs(centred_ifft2(k * weights)).astype(np.float32)
    # Effective image-domain noise std per real/imaginary channel after filtering and zero filling.
    noise_sigma = sigma * float(np.sqrt(np.mean(weights ** 2)))
    if rng.uniform() < 0.5:
        img = np.ascontiguousarray(img.T)        # phase-encode direction left-right
    window = percentile_window(img, 0.5, 99.5)
    return SimulatedImage("MR", window.apply(img), img, window,
                          {"anatomy": phantom.anatomy, "protocol": protocol, "tr_ms": tr, "te_ms": te,
                           "snr": snr, "partial_fourier": pf, "noise_sigma": noise_sigma})
