"""Generative model families trained on the simulated reals; see ``base.GenerativeModel``."""

from __future__ import annotations

from .base import GenerativeModel
from .diffusion import ConditionalDDPM
from .flow import ConditionalGlow
from .gan import ConditionalGAN
from .vae import ConditionalVAE

FAMILIES: dict[str, type[GenerativeModel]] = {
    "gan": ConditionalGAN,
    "vae": ConditionalVAE,
    "ddpm": ConditionalDDPM,
    "flow": ConditionalGlow,
}


def build(family: str, *, tiny: bool = False, **overrides: object) -> GenerativeModel:
    """A fresh model of ``family`` (default config, or the test-sized ``TINY_CONFIG``) with overrides."""
    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; expected one of {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    cfg = {**(cls.TINY_CONFIG if tiny else {}), **overrides}
    return cls.from_config(**cfg)


__all__ = ["FAMILIES", "GenerativeModel", "build"]
