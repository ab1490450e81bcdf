"""The interface every generator family implements, and the family registry.

Images enter and leave a model as ``(B, 1, S, S)`` float tensors in [-1, 1];
class labels are modality indices (``common.MODALITIES``). Sampling is split in
two so that it is reproducible per image: the caller draws each image's noise
with its own seeded ``torch.Generator`` (shape ``noise_shape()``), then
``decode`` maps a batch of noise to images deterministically. Models sample in
``eval()`` mode, so an image does not depend on the other images of its batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class GenerativeModel(nn.Module):
    family: ClassVar[str] = ""
    DEFAULT_CONFIG: ClassVar[dict[str, Any]] = {}
    TINY_CONFIG: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)

    @classmethod
    def from_config(cls, **overrides: Any) -> "GenerativeModel":
        cfg = {**cls.DEFAULT_CONFIG, **overrides}
        unknown = set(cfg) - set(cls.DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"{cls.family}: unknown config key(s) {', '.join(sorted(unknown))}")
        return cls(cfg)

    @property
    def size(self) -> int:
        return int(self.config["size"])

    @property
    def n_classes(self) -> int:
        return int(self.config["n_classes"])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=float(self.config.get("lr", 2e-4)))]

    def training_step(self, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      generator: torch.Generator) -> dict[str, float]:
        """One optimisation step on a batch; randomness only from ``generator``. Returns scalar losses."""
        raise NotImplementedError

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one image's sampling noise (without the batch dimension)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, *noise_shape) noise + (B,) labels -> (B, 1, S, S) images in [-1, 1]."""
        raise NotImplementedError

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_size(size: int, n_levels: int, base: int = 4) -> None:
    if size != base * 2 ** n_levels:
        raise ValueError(f"size {size} does not match {n_levels} up/down-sampling levels from {base} "
                         f"(expected {base * 2 ** n_levels})")
