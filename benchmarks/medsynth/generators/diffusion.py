"""Class-conditional DDPM (Ho et al. 2020) with a small UNet, sampled with DDIM (Song et al. 2021).

Training: epsilon prediction, uniform timestep, cosine noise schedule (Nichol &
Dhariwal 2021) over ``timesteps`` steps. Sampling: deterministic DDIM (eta = 0)
over ``ddim_steps`` evenly spaced timesteps, so an image is a function of its
initial noise alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(c_in), c_in)
        self.c1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.e = nn.Linear(emb, c_out)
        self.n2 = nn.GroupNorm(_groups(c_out), c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        nn.init.zeros_(self.c2.weight)
        nn.init.zeros_(self.c2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.e(emb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class UNet(nn.Module):
    def __init__(self, channels: tuple[int, ...], n_classes: int, emb: int) -> None:
        super().__init__()
        self.emb_dim = emb
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.y_emb = nn.Embedding(n_classes, emb)
        self.conv_in = nn.Conv2d(1, channels[0], 3, 1, 1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_prev = channels[0]
        for i, c in enumerate(channels):
            self.down.append(_ResBlock(c_prev, c, emb))
            c_prev = c
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, 2, 1))
        self.mid = _ResBlock(c_prev, c_prev, emb)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up.append(_ResBlock(c_prev + c, c, emb))
            c_prev = c
            if i > 0:
                self.upsample.append(nn.Conv2d(c, channels[i - 1], 3, 1, 1))
                c_prev = channels[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(c_prev), c_prev), nn.SiLU(), nn.Conv2d(c_prev, 1, 3, 1, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.t_mlp(timestep_embedding(t, self.emb_dim)) + self.y_emb(y)
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ac = f / f[0]
    betas = (1 - ac[1:] / ac[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


class ConditionalDDPM(GenerativeModel):
    family = "ddpm"
    DEFAULT_CONFIG: dict[str, Any] = {
        "size": 128, "n_classes": 4, "channels": (16, 32, 64, 96), "emb": 64,
        "timesteps": 1000, "ddim_steps": 25, "lr": 2e-4,
    }
    TINY_CONFIG: dict[str, Any] = {"channels": (4, 8), "emb": 8, "ddim_steps": 2}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        self.unet = UNet(tuple(c["channels"]), c["n_classes"], c["emb"])
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(int(c["timesteps"])), persistent=False)

    def noise_shape(self) -> tuple[int, ...]:
        return (1, self.size, self.size)

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, int(self.config["timesteps"]), (x.shape[0],), generator=generator)
        eps = torch.randn(x.shape, generator=generator)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * eps
        return F.mse_loss(self.unet(xt, t, y), eps)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      generator: torch.Generator) -> dict[str, float]:
        (opt,) = optimizers
        loss = self.loss(x, y, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        T = int(self.config["timesteps"])
        steps = torch.linspace(T - 1, 0, int(self.config["ddim_steps"])).round().long().tolist()
        x = noise
        for i, t in enumerate(steps):
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
            eps = self.unet(x, torch.full((x.shape[0],), t, dtype=torch.long), labels)
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1.0, 1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1.0, 1.0)
