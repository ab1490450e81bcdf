"""Synthetic medical imaging benchmark: physics-based acquisition simulators (reals) and small
generative models trained on them (fakes). See ``benchmarks/medsynth/README.md``."""

from .common import MODALITIES, SimulatedImage, Window, image_rng, image_seed

__all__ = ["MODALITIES", "SimulatedImage", "Window", "image_rng", "image_seed"]
