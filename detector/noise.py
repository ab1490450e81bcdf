"""Noise-domain residual extractors of the forensics literature.

All three suppress image content and keep the high-frequency residue where
generator traces live, and all three map a constant image to exactly zero:

* ``SRMResidual``: three fixed SRM high-pass kernels (Fridrich & Kodovsky 2012,
  the triple used by RGB-N / AIDE); every kernel sums to zero.
* ``BayarConv2d``: a learnable convolution constrained as in Bayar & Stamm
  (2016/2018): centre weight -1, the other weights sum to 1, so every kernel
  slice sums to zero.  The constraint is applied by projection in ``forward``,
  so it holds whatever the optimiser did to the raw weights.
* ``npr_residual``: neighbouring-pixel relationships (Tan et al., CVPR 2024):
  ``x - up2(down2(x))`` with nearest-neighbour resampling, the trace left by the
  upsampling layers of generators.

Inputs are (B, C, H, W) float tensors in [0, 1] at native resolution.
Convolutions pad by reflection so that borders carry no artificial edge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SRMResidual", "BayarConv2d", "npr_residual", "srm_kernels"]


def srm_kernels() -> torch.Tensor:
    """The three 5×5 SRM kernels, (3, 5, 5), each normalised by its divisor; each sums to 0."""
    k1 = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, -1, 2, -1, 0],
            [0, 2, -4, 2, 0],
            [0, -1, 2, -1, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    ) / 4.0
    k2 = torch.tensor(
        [
            [-1, 2, -2, 2, -1],
            [2, -6, 8, -6, 2],
            [-2, 8, -12, 8, -2],
            [2, -6, 8, -6, 2],
            [-1, 2, -2, 2, -1],
        ],
        dtype=torch.float64,
    ) / 12.0
    k3 = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 1, -2, 1, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    ) / 2.0
    return torch.stack([k1, k2, k3]).float()


class SRMResidual(nn.Module):
    """Fixed SRM high-pass filtering.

    ``per_channel=True`` filters every input channel with the three kernels
    (3·C output channels, colour traces kept); ``False`` filters the channel
    mean (3 output channels).  The kernels are a non-trainable buffer.
    """

    def __init__(self, in_channels: int = 3, per_channel: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.per_channel = per_channel
        k = srm_kernels().unsqueeze(1)  # (3, 1, 5, 5)
        if per_channel:
            k = k.repeat(in_channels, 1, 1, 1)  # grouped: channel c -> outputs 3c..3c+2
        self.register_buffer("kernels", k, persistent=False)
        if per_channel:
            self.register_buffer("dense", self._block_diagonal(k, in_channels), persistent=False)

    @property
    def out_channels(self) -> int:
        return 3 * self.in_channels if self.per_channel else 3

    @property
    def kernel_size(self) -> int:
        return int(self.kernels.shape[-1])

    def dense_kernels(self) -> torch.Tensor:
        """The per-channel filtering as one dense (3·C, C, 5, 5) weight, zero off the diagonal blocks.

        Lets a caller stack these kernels with another filter bank of the same size into
        a single convolution; the zeros contribute exact zeros, so the output is the same.
        """
        if not self.per_channel:
            raise ValueError("dense_kernels needs per_channel=True (the channel mean is not a block-diagonal filter)")
        return self.dense

    @staticmethod
    def _block_diagonal(grouped: torch.Tensor, in_channels: int) -> torch.Tensor:
        per = grouped.shape[0] // in_channels
        dense = grouped.new_zeros(grouped.shape[0], in_channels, *grouped.shape[-2:])
        for i in range(in_channels):
            dense[per * i:per * (i + 1), i] = grouped[per * i:per * (i + 1), 0]
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_channel:
            x = x.mean(dim=1, keepdim=True)
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        groups = self.in_channels if self.per_channel else 1
        return F.conv2d(x, self.kernels.to(x.dtype), groups=groups)


class BayarConv2d(nn.Module):
    """Constrained convolution: per (out, in) kernel slice, centre -1 and the rest summing to 1."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, kernel_size: int = 5) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"Bayar kernel size must be odd and >= 3, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        centre = torch.zeros(kernel_size, kernel_size, dtype=torch.bool)
        centre[kernel_size // 2, kernel_size // 2] = True
        self.register_buffer("centre_mask", centre, persistent=False)
        # Start from a feasible point: raw slices then sum to 1 off-centre, far from the
        # division by ~0 that a zero-mean random slice would risk.
        with torch.no_grad():
            self.weight.abs_()
        self.project_()

    def constrained_weight(self) -> torch.Tensor:
        """The projected weights actually used; differentiable w.r.t. ``weight``."""
        off = self.weight.masked_fill(self.centre_mask, 0.0)
        total = off.sum(dim=(2, 3), keepdim=True)
        # A raw slice summing to ~0 cannot be rescaled to 1: fall back to a uniform neighbourhood.
        n = self.kernel_size * self.kernel_size - 1
        uniform = (~self.centre_mask).to(off.dtype) / n
        safe = total.abs() > 1e-8
        off = torch.where(safe, off / torch.where(safe, total, torch.ones_like(total)), uniform)
        return off.masked_fill(self.centre_mask, -1.0)

    @torch.no_grad()
    def project_(self) -> None:
        """Write the projection back into ``weight`` (Bayar & Stamm do this after every step)."""
        self.weight.copy_(self.constrained_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kernel_size // 2
        x = F.pad(x, (p, p, p, p), mode="reflect")
        return F.conv2d(x, self.constrained_weight().to(x.dtype))


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - nearest_up2(nearest_down2(x))``; odd sizes keep their last row/column's own sample.

    Nearest 2× downsampling keeps the even-indexed pixels; upsampling repeats
    each of them over its 2×2 cell and crops back to the input size, so the
    residual is zero on even positions and the difference to the even
    neighbour elsewhere.
    """
    if x.dim() != 4:
        raise ValueError(f"npr_residual expects (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    down = x[..., ::2, ::2]
    up = down.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :h, :w]
    return x - up
