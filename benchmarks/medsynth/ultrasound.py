"""B-mode ultrasound simulation: scatterer field, pulse-echo PSF, envelope detection, log compression.

Physics modelled, in order:

1. **Scatterers**: tissue is a dense random field of sub-resolution scatterers.
   On a fine grid (``AXIAL_OVERSAMPLE`` samples per output pixel in depth, so the
   RF carrier is resolved) each cell holds a zero-mean Gaussian reflectivity with
   variance ``density * echogenicity^2`` of its tissue: many scatterers per
   resolution cell give *fully developed speckle*. Cysts and vessels are
   anechoic, fat and organ capsules hyperechoic; tissue interfaces add specular
   reflections proportional to the acoustic impedance jump.
2. **Attenuation and TGC**: the round-trip amplitude decays as
   ``exp(-2 alpha f0 z)`` (alpha ~ 0.5 dB/cm/MHz); time-gain compensation undoes
   most of it, imperfectly.
3. **Pulse-echo PSF**: a separable point-spread function, a Gaussian-enveloped
   cosine at the centre frequency along depth (the transmitted pulse) times a
   Gaussian beam profile laterally, applied by FFT convolution: the RF image.
4. **Envelope detection**: the analytic signal of each RF line (A-line) via the
   Hilbert transform in the Fourier domain (negative frequencies removed), and its
   modulus. For fully developed speckle the envelope is Rayleigh distributed:
   ``std / mean = sqrt(4/pi - 1) = 0.523``.
5. **Log compression** to a display dynamic range of 45-65 dB, and optional
   scan conversion to a curvilinear (sector) geometry with black outside the fan.
"""

from __future__ import annotations

import numpy as np

from .common import SimulatedImage, Window
from .phantoms import Tissue, ellipse_mask, property_map, smooth_field

AXIAL_OVERSAMPLE = 4
RAYLEIGH_SNR_INV = float(np.sqrt(4.0 / np.pi - 1.0))   # 0.5227

# Tissue: (echogenicity (amplitude), acoustic impedance in MRayl).
TISSUE_US: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0004),
    Tissue.FAT: (0.8, 1.38),
    Tissue.MUSCLE: (0.45, 1.70),
    Tissue.LIVER: (0.6, 1.65),
    Tissue.KIDNEY: (0.35, 1.62),
    Tissue.FLUID: (0.02, 1.52),
    Tissue.BONE: (1.5, 7.8),
    Tissue.MARROW: (1.0, 1.8),
    Tissue.LUNG: (1.2, 0.3),
    Tissue.LESION: (1.0, 1.66),
    Tissue.BLOOD: (0.03, 1.61),
    Tissue.GREY: (0.4, 1.6),
    Tissue.WHITE: (0.5, 1.6),
}


def us_phantom(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Label map in probe coordinates (rows = depth): skin/fat, muscle, an organ with vessels, cysts, lesions."""
    h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    labels = np.full(shape, Tissue.LIVER if rng.uniform() < 0.6 else Tissue.KIDNEY, np.uint8)
    ripple = lambda a, f, p: a * np.sin(f * np.pi * xx + p)  # noqa: E731 - wavy layer boundaries
    fat_end = -1.0 + rng.uniform(0.08, 0.2) + ripple(rng.uniform(0, 0.03), rng.uniform(0.5, 2), rng.uniform(0, 6))
    muscle_end = fat_end + rng.uniform(0.1, 0.3) + ripple(rng.uniform(0, 0.05), rng.uniform(0.5, 2), rng.uniform(0, 6))
    labels[yy < muscle_end] = Tissue.MUSCLE
    labels[yy < fat_end] = Tissue.FAT
    # Organ capsule: a thin bright line just below the muscle.
    labels[(yy >= muscle_end) & (yy < muscle_end + 0.02)] = Tissue.MARROW
    for _ in range(int(rng.integers(1, 5))):         # vessels (anechoic, round or elongated)
        r = rng.uniform(0.03, 0.1)
        labels[ellipse_mask(yy, xx, rng.uniform(muscle_end.max() + 0.1, 0.9), rng.uniform(-0.8, 0.8),
                            r, r * rng.uniform(1.0, 4.0), rng.uniform(-0.4, 0.4))] = Tissue.BLOOD
    for _ in range(int(rng.integers(0, 3))):         # cysts
        r = rng.uniform(0.06, 0.18)
        labels[ellipse_mask(yy, xx, rng.uniform(0.0, 0.8), rng.uniform(-0.7, 0.7), r, r * rng.uniform(0.8, 1.4),
                            rng.uniform(0, np.pi))] = Tissue.FLUID
    for _ in range(int(rng.integers(0, 3))):         # solid lesions (hyper- or hypoechoic via jitter)
        r = rng.uniform(0.06, 0.15)
        labels[ellipse_mask(yy, xx, rng.uniform(0.0, 0.8), rng.uniform(-0.7, 0.7), r, r * rng.uniform(0.8, 1.4),
                            rng.uniform(0, np.pi))] = Tissue.LESION
    return labels


def pulse_echo_psf(f0_cycles_per_sample: float, axial_sigma: float,
                   lateral_sigma: float) -> np.ndarray:
    """Separable PSF: Gaussian-enveloped cosine along depth (fine samples) x Gaussian beam laterally."""
    za = np.arange(-int(4 * axial_sigma) - 1, int(4 * axial_sigma) + 2)
    xl = np.arange(-int(4 * lateral_sigma) - 1, int(4 * lateral_sigma) + 2)
    axial = np.exp(-za ** 2 / (2 * axial_sigma ** 2)) * np.cos(2 * np.pi * f0_cycles_per_sample * za)
    lateral = np.exp(-xl ** 2 / (2 * lateral_sigma ** 2))
    return np.outer(axial, lateral)


def fft_convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Linear ('same') 2-D convolution via zero-padded FFT."""
    h, w = img.shape
    kh, kw = kernel.shape
    shape = (h + kh - 1, w + kw - 1)
    out = np.real(np.fft.ifft2(np.fft.fft2(img, shape) * np.fft.fft2(kernel, shape)))
    return out[kh // 2: kh // 2 + h, kw // 2: kw // 2 + w]


def envelope(rf: np.ndarray, axis: int = 0) -> np.ndarray:
    """Modulus of the analytic signal along ``axis`` (Hilbert transform via FFT)."""
    n = rf.shape[axis]
    spec = np.fft.fft(rf, axis=axis)
    h = np.zeros(n)
    h[0] = 1.0
    if n % 2 == 0:
        h[n // 2] = 1.0
        h[1:n // 2] = 2.0
    else:
        h[1:(n + 1) // 2] = 2.0
    shape = [1] * rf.ndim
    shape[axis] = n
    return np.abs(np.fft.ifft(spec * h.reshape(shape), axis=axis))


def speckle_envelope(rng: np.random.Generator, amplitude: np.ndarray, *, f0: float = 0.2,
                     axial_sigma: float = 3.0, lateral_sigma: float = 1.5) -> np.ndarray:
    """Envelope of a Gaussian scatterer field with per-cell amplitude ``amplitude`` (fine grid, depth first)."""
    scatterers = rng.standard_normal(amplitude.shape) * amplitude
    rf = fft_convolve(scatterers, pulse_echo_psf(f0, axial_sigma, lateral_sigma))
    return envelope(rf, axis=0)


def scan_convert(img: np.ndarray, size: int, opening_rad: float, apex_frac: float) -> np.ndarray:
    """Map a (depth, beam) image onto a curvilinear fan in a size x size image (bilinear); 0 outside."""
    nd, nb = img.shape
    y = (np.arange(size) + 0.5) / size                 # 0 (top) .. 1 (bottom)
    x = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    r0 = apex_frac                                     # probe radius as fraction of the image height
    ry = yy + r0                                       # apex above the image top
    radius = np.sqrt(ry ** 2 + xx ** 2)
    angle = np.arctan2(xx, ry)
    depth = (radius - r0) * (nd - 1)                 # the fan spans one image height in depth
    beam = (angle / opening_rad + 0.5) * (nb - 1)
    inside = (depth >= 0) & (depth <= nd - 1) & (beam >= 0) & (beam <= nb - 1)
    d0 = np.clip(np.floor(depth).astype(int), 0, nd - 2)
    b0 = np.clip(np.floor(beam).astype(int), 0, nb - 2)
    fd = np.clip(depth - d0, 0, 1)
    fb = np.clip(beam - b0, 0, 1)
    v = (img[d0, b0] * (1 - fd) * (1 - fb) + img[d0 + 1, b0] * fd * (1 - fb)
         + img[d0, b0 + 1] * (1 - fd) * fb + img[d0 + 1, b0 + 1] * fd * fb)
    return np.where(inside, v, 0.0)


def simulate_us(rng: np.random.Generator, size: int = 128, *, dynamic_range_db: float | None = None,
                geometry: str | None = None) -> SimulatedImage:
    """One B-mode image. ``raw`` is the envelope (depth x lateral, output grid, before log compression)."""
    nz = size * AXIAL_OVERSAMPLE
    labels = us_phantom(rng, (nz, size))
    jitter = {t: e * rng.uniform(0.8, 1.25) for t, (e, _) in TISSUE_US.items()}
    echo = property_map(labels, jitter)
    echo = echo * np.exp(0.25 * smooth_field(rng, labels.shape, 0.05))     # tissue heterogeneity
    # Specular reflection at interfaces: amplitude reflection coefficient (Z2 - Z1) / (Z2 + Z1) along depth.
    z = property_map(labels, {t: zz for t, (_, zz) in TISSUE_US.items()}, 1.6)
    refl = np.zeros_like(z)
    refl[1:] = np.abs(np.diff(z, axis=0)) / (z[1:] + z[:-1])
    # Attenuation (round trip) with imperfect TGC.
    f0_mhz = rng.uniform(3.0, 7.0)
    depth_cm = rng.uniform(8.0, 16.0) * 5.0 / f0_mhz ** 0.5 / 2.2
    zc = np.linspace(0.0, depth_cm, nz)[:, None]
    att = np.exp(-2 * 0.5 / 8.686 * f0_mhz * zc)
    tgc = 1.0 / np.exp(-2 * 0.5 / 8.686 * f0_mhz * zc * rng.uniform(0.8, 1.0))
    amplitude = echo * att * tgc
    f0 = rng.uniform(0.15, 0.3)                        # carrier, cycles per fine sample
    axial_sigma = rng.uniform(1.5, 3.0) / f0 / 4.0     # pulse of ~1.5-3 cycles
    lateral_sigma = rng.uniform(0.8, 1.6)
    scatterers = rng.standard_normal(amplitude.shape) * amplitude
    speculars = refl * att * tgc * rng.uniform(20.0, 40.0) * (rng.uniform(size=refl.shape) < 0.7)
    rf = fft_convolve(scatterers + speculars, pulse_echo_psf(f0, axial_sigma, lateral_sigma))
    rf += rng.normal(0.0, 0.003, rf.shape)             # receiver noise
    env = envelope(rf, axis=0)
    env = env.reshape(size, AXIAL_OVERSAMPLE, size)[:, 0, :]  # sample the envelope on the output grid
    dr = float(dynamic_range_db if dynamic_range_db is not None else rng.uniform(45.0, 65.0))
    ref = float(np.percentile(env, 99.5))
    db = 20.0 * np.log10(np.maximum(env, 1e-12) / ref)
    bmode = np.clip((db + dr) / dr, 0.0, 1.0)
    geometry = geometry or ("curvilinear" if rng.uniform() < 0.5 else "linear")
    if geometry == "curvilinear":
        bmode = scan_convert(bmode, size, rng.uniform(0.9, 1.3), rng.uniform(0.15, 0.4))
    elif geometry != "linear":
        raise ValueError(f"geometry must be 'linear' or 'curvilinear', got {geometry!r}")
    image = bmode.astype(np.float32)
    return SimulatedImage("US", image, env.astype(np.float32), Window(0.5, 1.0),
                          {"f0_mhz": f0_mhz, "depth_cm": depth_cm, "dynamic_range_db": dr, "geometry": geometry,
                           "lateral_sigma_px": lateral_sigma})
