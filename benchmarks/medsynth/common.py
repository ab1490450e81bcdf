"""Shared types and seeding for the simulators and generators."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The four simulated modalities, in the order that fixes their index in seeds and
# class labels of the conditional generators. Radiography is written as DX (digital
# radiography, flat panel); ``radiography.simulate_radiograph(detector="CR")`` models a
# storage-phosphor plate instead.
MODALITIES: tuple[str, ...] = ("CT", "MR", "DX", "US")

# Source streams mixed into the per-image seed, so that reals and every generator draw
# from independent streams and adding a generator never shifts another one's images.
SOURCE_STREAMS: dict[str, int] = {"real": 0, "gan": 1, "vae": 2, "ddpm": 3, "flow": 4, "train": 99}


@dataclass(frozen=True)
class Window:
    """Display window in the image's physical unit: [center - width/2, center + width/2] -> [0, 1]."""

    center: float
    width: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        lo = self.center - self.width / 2.0
        return np.clip((values - lo) / self.width, 0.0, 1.0).astype(np.float32)


@dataclass
class SimulatedImage:
    """One simulated acquisition.

    ``image`` is the display image in [0, 1] (float32, what the data set stores);
    ``raw`` is the reconstruction in the modality's physical unit before windowing
    (CT: HU, MR: magnitude in arbitrary units, DX: log attenuation, US: envelope
    amplitude); ``params`` records the drawn acquisition parameters.
    """

    modality: str
    image: np.ndarray
    raw: np.ndarray
    window: Window
    params: dict[str, object] = field(default_factory=dict)


def image_seed(seed: int, modality_index: int, image_index: int, source: str = "real") -> np.random.SeedSequence:
    """Seed sequence of one image: a function of (seed, modality, index, source) only.

    Any subset of a data set regenerates identically, whatever else is generated in
    the same run; a SeedSequence (not ``seed + m + i``) keeps streams of different
    (modality, index) pairs from colliding.
    """
    if source not in SOURCE_STREAMS:
        raise ValueError(f"unknown source stream {source!r}; expected one of {', '.join(SOURCE_STREAMS)}")
    return np.random.SeedSequence([int(seed), int(modality_index), int(image_index), SOURCE_STREAMS[source]])


def image_rng(seed: int, modality_index: int, image_index: int, source: str = "real") -> np.random.Generator:
    return np.random.default_rng(image_seed(seed, modality_index, image_index, source))


def torch_seed(seed: int, modality_index: int, image_index: int, source: str) -> int:
    """63-bit integer for ``torch.Generator.manual_seed`` from the same seed sequence."""
    return int(image_seed(seed, modality_index, image_index, source).generate_state(2, np.uint64)[0] >> np.uint64(1))


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> Window:
    a, b = np.percentile(values, [lo, hi])
    if b <= a:
        b = a + 1.0
    return Window(center=float((a + b) / 2.0), width=float(b - a))
