"""Random anatomical phantoms shared by the acquisition simulators.

A phantom is a *tissue label map*: an integer image whose values index
:class:`Tissue`. Each simulator maps the labels to its own physical quantity
(CT: Hounsfield units, MR: proton density / T1 / T2, radiography: linear
attenuation, ultrasound: scatterer density and echogenicity), so one anatomy
drives four physically different images.

Anatomy is built from rotated ellipses painted in order (later shapes cover
earlier ones), like the Shepp-Logan phantom but randomised: position, size,
rotation and presence of every structure are drawn from the generator, so no two
phantoms are alike. Coordinates are normalised to [-1, 1] across the field of
view. Phantoms are rendered ``oversample`` times finer than the output grid so
that the simulators can model partial-volume effects and finite sampling
(detector aperture, k-space truncation) instead of committing the "inverse
crime" of simulating on the reconstruction grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2       # generic soft tissue
    LIVER = 3        # large parenchymal organ
    KIDNEY = 4       # small parenchymal organ (kidney, spleen)
    FLUID = 5        # cysts, bladder, CSF
    BONE = 6         # cortical bone
    MARROW = 7       # trabecular bone / marrow
    LUNG = 8
    LESION = 9
    BLOOD = 10       # vessels, heart chambers
    GREY = 11        # brain grey matter
    WHITE = 12       # brain white matter


ANATOMIES: tuple[str, ...] = ("abdomen", "thorax", "head")


@dataclass(frozen=True)
class Phantom:
    labels: np.ndarray     # (H, W) uint8 of Tissue values, rendered at the oversampled grid
    anatomy: str
    oversample: int


def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [-1, 1] for an n x n image."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="ij")


def ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                 theta: float = 0.0) -> np.ndarray:
    """Boolean mask of a rotated ellipse with centre (cy, cx), semi-axes (ry, rx), angle theta (rad)."""
    c, s = np.cos(theta), np.sin(theta)
    dy, dx = yy - cy, xx - cx
    u = c * dx + s * dy
    v = -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``scale`` (fraction of FOV).

    White noise low-passed with a Gaussian transfer function in the Fourier domain:
    used for tissue texture, coil sensitivities and heel effects.
    """
    h, w = shape
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    sigma_px = scale * max(h, w) / 2.0
    transfer = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy ** 2 + fx ** 2))
    field = np.real(np.fft.ifft2(np.fft.fft2(noise) * transfer))
    std = field.std()
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _paint(labels: np.ndarray, mask: np.ndarray, tissue: Tissue) -> None:
    labels[mask] = tissue


def _organ_lesions(rng: np.random.Generator, labels: np.ndarray, yy: np.ndarray, xx: np.ndarray,
                   host: Tissue, n_max: int, tissue: Tissue = Tissue.LESION) -> None:
    """Small round lesions placed inside ``host`` tissue (rejection-sampled centres)."""
    ys, xs = np.nonzero(labels == host)
    if len(ys) == 0:
        return
    for _ in range(int(rng.integers(0, n_max + 1))):
        k = int(rng.integers(len(ys)))
        cy, cx = yy[ys[k], xs[k]], xx[ys[k], xs[k]]
        r = rng.uniform(0.02, 0.07)
        m = ellipse_mask(yy, xx, cy, cx, r * rng.uniform(0.7, 1.3), r, rng.uniform(0, np.pi))
        labels[m & (labels == host)] = tissue


def _abdomen(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    labels = np.zeros(yy.shape, np.uint8)
    ry, rx = rng.uniform(0.55, 0.72), rng.uniform(0.75, 0.88)
    cy, cx = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    fat = rng.uniform(0.04, 0.12)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry, rx), Tissue.FAT)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - fat, rx - fat), Tissue.MUSCLE)
    # Visceral fat pockets inside the muscle wall.
    for _ in range(int(rng.integers(2, 6))):
        _paint(labels, ellipse_mask(yy, xx, cy + rng.uniform(-0.3, 0.2), cx + rng.uniform(-0.5, 0.5),
                                    rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.2), rng.uniform(0, np.pi)),
               Tissue.FAT)
    side = rng.choice([-1.0, 1.0])
    # Liver on one side, spleen on the other.
    _paint(labels, ellipse_mask(yy, xx, cy - rng.uniform(0.0, 0.15), cx + side * rng.uniform(0.25, 0.4),
                                rng.uniform(0.25, 0.38), rng.uniform(0.25, 0.38), rng.uniform(-0.5, 0.5)),
           Tissue.LIVER)
    _paint(labels, ellipse_mask(yy, xx, cy - rng.uniform(0.0, 0.15), cx - side * rng.uniform(0.4, 0.55),
                                rng.uniform(0.08, 0.15), rng.uniform(0.06, 0.12), rng.uniform(-0.8, 0.8)),
           Tissue.KIDNEY)
    # Kidneys beside the spine.
    for s in (-1.0, 1.0):
        if rng.uniform() < 0.85:
            kcy, kcx = cy + rng.uniform(0.15, 0.3), cx + s * rng.uniform(0.25, 0.35)
            _paint(labels, ellipse_mask(yy, xx, kcy, kcx, rng.uniform(0.08, 0.12), rng.uniform(0.05, 0.08),
                                        s * rng.uniform(0.2, 0.7)), Tissue.KIDNEY)
            if rng.uniform() < 0.5:   # renal pelvis
                _paint(labels, ellipse_mask(yy, xx, kcy, kcx - s * 0.02, 0.03, 0.02), Tissue.FLUID)
    # Spine: vertebral body (cortex + marrow), aorta in front of it.
    vy, vx = cy + ry - fat - rng.uniform(0.18, 0.26), cx + rng.uniform(-0.03, 0.03)
    vr = rng.uniform(0.08, 0.11)
    _paint(labels, ellipse_mask(yy, xx, vy, vx, vr, vr * 1.1), Tissue.BONE)
    _paint(labels, ellipse_mask(yy, xx, vy, vx, vr * 0.8, vr * 0.88), Tissue.MARROW)
    _paint(labels, ellipse_mask(yy, xx, vy + vr * 1.5, vx, vr * 0.5, vr * 0.35), Tissue.BONE)
    _paint(labels, ellipse_mask(yy, xx, vy - vr - 0.06, vx + rng.uniform(-0.08, 0.02), 0.045, 0.045), Tissue.BLOOD)
    _paint(labels, ellipse_mask(yy, xx, vy - vr - 0.05, vx + 0.1, 0.04, 0.05), Tissue.BLOOD)
    # Bowel: gas pockets and fluid-filled loops.
    for _ in range(int(rng.integers(1, 6))):
        t = Tissue.AIR if rng.uniform() < 0.6 else Tissue.FLUID
        _paint(labels, ellipse_mask(yy, xx, cy + rng.uniform(-0.4, 0.1), cx + rng.uniform(-0.4, 0.4),
                                    rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.1), rng.uniform(0, np.pi)), t)
    _organ_lesions(rng, labels, yy, xx, Tissue.LIVER, 3)
    _organ_lesions(rng, labels, yy, xx, Tissue.LIVER, 1, Tissue.FLUID)
    return labels


def _thorax(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    labels = np.zeros(yy.shape, np.uint8)
    ry, rx = rng.uniform(0.5, 0.65), rng.uniform(0.78, 0.88)
    cy, cx = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    fat = rng.uniform(0.03, 0.09)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry, rx), Tissue.FAT)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - fat, rx - fat), Tissue.MUSCLE)
    # Ribs: small bone ellipses along the inner chest wall.
    n_ribs = int(rng.integers(8, 14))
    for k in range(n_ribs):
        a = np.pi * (k + rng.uniform(0.2, 0.8)) / n_ribs * 2.0
        rr = 0.92
        _paint(labels, ellipse_mask(yy, xx, cy + (ry - fat - 0.03) * rr * np.sin(a),
                                    cx + (rx - fat - 0.03) * rr * np.cos(a), 0.025, 0.035, a), Tissue.BONE)
    for s in (-1.0, 1.0):
        _paint(labels, ellipse_mask(yy, xx, cy + rng.uniform(-0.05, 0.05), cx + s * rng.uniform(0.32, 0.42),
                                    ry - fat - rng.uniform(0.08, 0.14), rng.uniform(0.25, 0.33),
                                    s * rng.uniform(-0.3, 0.3)), Tissue.LUNG)
    # Heart and great vessels between the lungs.
    hcx = cx + rng.uniform(-0.12, 0.05)
    _paint(labels, ellipse_mask(yy, xx, cy - rng.uniform(0.0, 0.12), hcx, rng.uniform(0.2, 0.28),
                                rng.uniform(0.18, 0.26), rng.uniform(-0.6, 0.6)), Tissue.MUSCLE)
    _paint(labels, ellipse_mask(yy, xx, cy - 0.05, hcx + 0.03, 0.1, 0.08, rng.uniform(0, np.pi)), Tissue.BLOOD)
    vy = cy + ry - fat - rng.uniform(0.15, 0.22)
    vr = rng.uniform(0.07, 0.1)
    _paint(labels, ellipse_mask(yy, xx, vy, cx, vr, vr * 1.1), Tissue.BONE)
    _paint(labels, ellipse_mask(yy, xx, vy, cx, vr * 0.8, vr * 0.88), Tissue.MARROW)
    _paint(labels, ellipse_mask(yy, xx, vy - vr - 0.05, cx + 0.08, 0.05, 0.05), Tissue.BLOOD)
    _paint(labels, ellipse_mask(yy, xx, cy - ry + fat + 0.06, cx, 0.03, 0.08), Tissue.BONE)   # sternum
    _organ_lesions(rng, labels, yy, xx, Tissue.LUNG, 3)
    return labels


def _head(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    labels = np.zeros(yy.shape, np.uint8)
    ry, rx = rng.uniform(0.72, 0.88), rng.uniform(0.58, 0.72)
    cy, cx = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    th = rng.uniform(-0.15, 0.15)
    skin = rng.uniform(0.03, 0.05)
    skull = rng.uniform(0.04, 0.07)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry, rx, th), Tissue.FAT)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - skin, rx - skin, th), Tissue.BONE)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - skin - skull * 0.35, rx - skin - skull * 0.35, th),
           Tissue.MARROW)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - skin - skull * 0.7, rx - skin - skull * 0.7, th), Tissue.BONE)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - skin - skull, rx - skin - skull, th), Tissue.FLUID)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, ry - skin - skull - 0.02, rx - skin - skull - 0.02, th), Tissue.GREY)
    _paint(labels, ellipse_mask(yy, xx, cy, cx, (ry - skin - skull) * 0.78, (rx - skin - skull) * 0.75, th),
           Tissue.WHITE)
    # Deep grey nuclei and ventricles.
    for s in (-1.0, 1.0):
        _paint(labels, ellipse_mask(yy, xx, cy + rng.uniform(-0.05, 0.1), cx + s * rng.uniform(0.12, 0.18),
                                    0.08, 0.045, s * 0.4 + th), Tissue.GREY)
        _paint(labels, ellipse_mask(yy, xx, cy + rng.uniform(-0.2, -0.05), cx + s * rng.uniform(0.04, 0.08),
                                    rng.uniform(0.1, 0.2), rng.uniform(0.025, 0.05), -s * 0.3 + th), Tissue.FLUID)
    _organ_lesions(rng, labels, yy, xx, Tissue.WHITE, 3)
    return labels


_BUILDERS = {"abdomen": _abdomen, "thorax": _thorax, "head": _head}


def random_phantom(rng: np.random.Generator, size: int, oversample: int = 2,
                   anatomy: str | None = None) -> Phantom:
    """A random axial-section phantom (abdomen, thorax or head) on a ``size * oversample`` grid."""
    if anatomy is None:
        anatomy = str(rng.choice(ANATOMIES))
    if anatomy not in _BUILDERS:
        raise ValueError(f"unknown anatomy {anatomy!r}; expected one of {', '.join(ANATOMIES)}")
    yy, xx = grid(size * oversample)
    return Phantom(_BUILDERS[anatomy](rng, yy, xx), anatomy, oversample)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Box average over factor x factor blocks: the partial-volume effect of a finite pixel."""
    if factor == 1:
        return img
    h, w = img.shape
    return img.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def property_map(labels: np.ndarray, values: dict[Tissue, float], default: float = 0.0) -> np.ndarray:
    """Float image of a per-tissue property (a lookup table over the label map)."""
    lut = np.full(max(int(t) for t in Tissue) + 1, default, dtype=np.float64)
    for t, v in values.items():
        lut[int(t)] = v
    return lut[labels]
