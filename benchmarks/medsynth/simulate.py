"""The simulator of each modality, and one seeded entry point for the real images of a data set."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .common import MODALITIES, SimulatedImage, image_rng
from .ct import simulate_ct
from .mr import simulate_mr
from .radiography import simulate_radiograph
from .ultrasound import simulate_us

SIMULATORS: dict[str, Callable[..., SimulatedImage]] = {
    "CT": simulate_ct,
    "MR": simulate_mr,
    "DX": simulate_radiograph,
    "US": simulate_us,
}
assert tuple(SIMULATORS) == MODALITIES


def simulate(modality: str, seed: int, index: int, size: int = 128, source: str = "real") -> SimulatedImage:
    """Real image ``index`` of ``modality`` for ``seed``: depends on nothing else (any subset regenerates)."""
    if modality not in SIMULATORS:
        raise ValueError(f"unknown modality {modality!r}; simulated modalities are {', '.join(MODALITIES)}")
    rng: np.random.Generator = image_rng(seed, MODALITIES.index(modality), index, source)
    return SIMULATORS[modality](rng, size)
