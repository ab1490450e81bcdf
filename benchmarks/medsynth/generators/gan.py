"""Class-conditional DCGAN: transposed-convolution generator, projection discriminator, hinge loss.

The generator upsamples 4x4 -> S x S with ``ConvTranspose2d(kernel 4, stride 2)``
layers, the classic source of checkerboard traces in GAN images. The
discriminator is a strided-convolution CNN with spectral normalisation and a
projection term for the class (Miyato & Koyama 2018).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .base import GenerativeModel, check_size


class _Generator(nn.Module):
    def __init__(self, size: int, nz: int, n_classes: int, emb: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        check_size(size, len(channels))
        self.embed = nn.Embedding(n_classes, emb)
        self.fc = nn.Linear(nz + emb, channels[0] * 16)
        self.bn0 = nn.BatchNorm2d(channels[0])
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, list(channels[1:]) + [1]):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=c_out == 1))
            if c_out != 1:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.c0 = channels[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1)).view(-1, self.c0, 4, 4)
        return torch.tanh(self.net(F.relu(self.bn0(h))))


class _Discriminator(nn.Module):
    def __init__(self, size: int, n_classes: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        check_size(size, len(channels))
        layers: list[nn.Module] = []
        c_prev = 1
        for c in channels:
            layers += [spectral_norm(nn.Conv2d(c_prev, c, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c_prev = c
        self.net = nn.Sequential(*layers)
        self.fc = spectral_norm(nn.Linear(c_prev * 16, 1))
        self.proj = spectral_norm(nn.Embedding(n_classes, c_prev * 16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).flatten(1)
        return self.fc(h).squeeze(1) + (self.proj(y) * h).sum(1)


class ConditionalGAN(GenerativeModel):
    family = "gan"
    DEFAULT_CONFIG: dict[str, Any] = {
        "size": 128, "n_classes": 4, "nz": 64, "emb": 16,
        "g_channels": (128, 96, 64, 32, 16), "d_channels": (16, 32, 64, 96, 128),
        "lr": 2e-4,
    }
    TINY_CONFIG: dict[str, Any] = {"nz": 8, "emb": 4, "g_channels": (8, 8, 4, 4, 4), "d_channels": (4, 4, 8, 8, 8)}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        self.G = _Generator(c["size"], c["nz"], c["n_classes"], c["emb"], tuple(c["g_channels"]))
        self.D = _Discriminator(c["size"], c["n_classes"], tuple(c["d_channels"]))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = float(self.config["lr"])
        return [torch.optim.Adam(self.G.parameters(), lr=lr, betas=(0.0, 0.9)),
                torch.optim.Adam(self.D.parameters(), lr=lr * 2, betas=(0.0, 0.9))]

    def noise_shape(self) -> tuple[int, ...]:
        return (int(self.config["nz"]),)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      generator: torch.Generator) -> dict[str, float]:
        opt_g, opt_d = optimizers
        z = torch.randn(x.shape[0], *self.noise_shape(), generator=generator)
        fake = self.G(z, y)
        d_loss = F.relu(1.0 - self.D(x, y)).mean() + F.relu(1.0 + self.D(fake.detach(), y)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -self.D(fake, y).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.G(noise, labels)
