"""Class-conditional convolutional VAE (Kingma & Welling 2014).

Encoder: strided 3x3 convolutions down to 4x4, a linear layer to the Gaussian
posterior. Decoder: nearest-neighbour upsampling + 3x3 convolution (not
transposed convolutions, so its upsampling trace differs from the GAN's). Loss:
Gaussian reconstruction error (sum of squares / 2 sigma^2) + beta * KL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, check_size


class ConditionalVAE(GenerativeModel):
    family = "vae"
    DEFAULT_CONFIG: dict[str, Any] = {
        "size": 128, "n_classes": 4, "latent": 64, "emb": 16,
        "channels": (16, 32, 64, 96, 128), "recon_sigma": 0.1, "beta": 1.0, "lr": 1e-3,
    }
    TINY_CONFIG: dict[str, Any] = {"latent": 8, "emb": 4, "channels": (4, 4, 8, 8, 8)}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        ch = tuple(c["channels"])
        check_size(c["size"], len(ch))
        self.embed = nn.Embedding(c["n_classes"], c["emb"])
        enc: list[nn.Module] = []
        c_prev = 1
        for cc in ch:
            enc += [nn.Conv2d(c_prev, cc, 3, 2, 1), nn.SiLU()]
            c_prev = cc
        self.encoder = nn.Sequential(*enc)
        self.to_posterior = nn.Linear(c_prev * 16 + c["emb"], 2 * c["latent"])
        self.from_latent = nn.Linear(c["latent"] + c["emb"], c_prev * 16)
        dec: list[nn.Module] = []
        rev = list(reversed(ch))
        for c_in, c_out in zip(rev, rev[1:] + [rev[-1]]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1), nn.SiLU()]
        dec += [nn.Conv2d(rev[-1], 1, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)
        self.c_top = c_prev

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.encoder(x).flatten(1), self.embed(y)], dim=1)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def _decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(torch.cat([z, self.embed(y)], dim=1)).view(-1, self.c_top, 4, 4)
        return torch.tanh(self.decoder(F.silu(h)))

    def noise_shape(self) -> tuple[int, ...]:
        return (int(self.config["latent"]),)

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
        recon = self._decode(z, y)
        sigma = float(self.config["recon_sigma"])
        rec = ((recon - x) ** 2).flatten(1).sum(1).mean() / (2 * sigma ** 2)
        kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp())).sum(1).mean()
        return {"loss": rec + float(self.config["beta"]) * kl, "recon": rec, "kl": kl}

    def training_step(self, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      generator: torch.Generator) -> dict[str, float]:
        (opt,) = optimizers
        losses = self.loss(x, y, generator)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return {k: v.item() for k, v in losses.items()}

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._decode(noise, labels)
