"""CDFA, the cross-domain fine-trace adapter (our reconstruction, see DESIGN.md).

A few evenly spaced blocks of the frozen open_clip ViT are wrapped by
``CDFABlock``.  After the frozen block runs, the wrapper adds

* a spatial bottleneck adapter on all tokens (LayerNorm, down-projection, GELU,
  up-projection; the up-projection starts at zero), and
* noise-domain tokens, from ``NoiseEncoder`` (SRM, Bayar and NPR residuals of
  the native-resolution crop, patch-embedded on the ViT token grid), added to
  the patch tokens (never the class token) through a per-channel
  ``tanh(gate)`` that starts at zero.

Both start at exactly zero, so at initialisation the adapted model computes
the frozen backbone's embedding bit for bit and training starts from it.

The noise tokens of the current forward pass reach the wrappers through a
``NoiseContext`` owned by the model (thread-local, so that worker threads
sharing one model cannot see each other's tokens); open_clip is not modified.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from detector.noise import BayarConv2d, SRMResidual, npr_residual
from detector.spec import CDFASpec

logger = logging.getLogger(__name__)

__all__ = [
    "BottleneckAdapter",
    "CDFABlock",
    "NoiseContext",
    "NoiseEncoder",
    "evenly_spaced_blocks",
    "inject_cdfa",
    "resolve_blocks",
]


def evenly_spaced_blocks(num_layers: int, num_blocks: int) -> tuple[int, ...]:
    """``num_blocks`` block indices splitting the stack into equal parts, the last block excluded.

    Block ``round(L·(i+1)/(n+1)) - 1`` for i < n: 24 layers, 3 blocks -> (5, 11, 17);
    12 -> (2, 5, 8); 4 -> (0, 1, 2).  The final block is left out on purpose:
    noise tokens enter the patch tokens only, and reach the class token (the
    pooled embedding) through the attention of later blocks.
    """
    if num_layers < 2:
        raise ValueError(f"CDFA needs a transformer with at least 2 blocks, got {num_layers}")
    if num_blocks >= num_layers:
        return tuple(range(num_layers - 1))
    idx = [int(math.floor(num_layers * (i + 1) / (num_blocks + 1) + 0.5)) - 1 for i in range(num_blocks)]
    return tuple(sorted(set(min(max(i, 0), num_layers - 2) for i in idx)))


def resolve_blocks(spec: CDFASpec, num_layers: int) -> tuple[int, ...]:
    if spec.blocks is None:
        return evenly_spaced_blocks(num_layers, spec.num_blocks)
    blocks = tuple(sorted(set(spec.blocks)))
    bad = [b for b in blocks if not 0 <= b < num_layers]
    if bad:
        raise ValueError(f"cdfa.blocks {bad} out of range for a transformer with {num_layers} blocks")
    return blocks


class NoiseContext(threading.local):
    """The noise tokens of the forward pass running in this thread."""

    tokens: torch.Tensor | None = None

    @contextmanager
    def bind(self, tokens: torch.Tensor) -> Iterator[None]:
        self.tokens = tokens
        try:
            yield
        finally:
            self.tokens = None

    # A fresh, empty context on copy/pickle: tokens are per forward, never state.
    def __deepcopy__(self, memo: dict) -> NoiseContext:
        return type(self)()

    def __reduce__(self):  # type: ignore[override]
        return (type(self), ())


class NoiseEncoder(nn.Module):
    """Residuals of the native-resolution crop -> (B, grid², width) tokens on the ViT grid."""

    def __init__(
        self,
        width: int,
        grid: int,
        channels: int = 16,
        bayar_kernels: int = 3,
        bayar_size: int = 5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.srm = SRMResidual(in_channels, per_channel=True)
        self.bayar = BayarConv2d(in_channels, bayar_kernels, bayar_size)
        residual_channels = self.srm.out_channels + bayar_kernels + in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(residual_channels, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
        )
        # Adaptive pooling makes any crop size land on the token grid; pooling after the
        # non-linearity keeps residual energy statistics that plain averaging would cancel.
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.embed = nn.Linear(channels, width)
        self.norm = nn.LayerNorm(width)

    def residuals(self, noise: torch.Tensor) -> torch.Tensor:
        """SRM, Bayar and NPR residuals, concatenated in that order along the channels."""
        if self.srm.per_channel and self.bayar.kernel_size == self.srm.kernel_size:
            # Both filter banks in one reflect pad and one dense convolution: half the time of
            # a grouped and a dense convolution (each pass over a 3-channel input is memory-bound).
            p = self.srm.kernel_size // 2
            weight = torch.cat([self.srm.dense_kernels(), self.bayar.constrained_weight()]).to(noise.dtype)
            filtered = F.conv2d(F.pad(noise, (p, p, p, p), mode="reflect"), weight)
            return torch.cat([filtered, npr_residual(noise)], dim=1)
        return torch.cat([self.srm(noise), self.bayar(noise), npr_residual(noise)], dim=1)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        if noise.dim() != 4:
            raise ValueError(f"noise crop must be (B, C, H, W), got shape {tuple(noise.shape)}")
        x = self.pool(self.stem(self.residuals(noise)))  # (B, channels, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # row-major like the ViT's patch tokens
        return self.norm(self.embed(x))


class BottleneckAdapter(nn.Module):
    """LayerNorm -> down -> GELU -> up, with the up-projection zero-initialised (output 0 at init)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.norm(x))))


class CDFABlock(nn.Module):
    """A frozen open_clip residual block followed by the spatial adapter and the gated noise tokens."""

    def __init__(
        self,
        block: nn.Module,
        width: int,
        bottleneck: int,
        context: NoiseContext,
        batch_first: bool = True,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.block = block
        self.adapter = BottleneckAdapter(width, bottleneck)
        self.gate = nn.Parameter(torch.zeros(width))
        self.batch_first = batch_first
        self.num_prefix_tokens = num_prefix_tokens
        self.context = context  # not a Module: shared with the model, holds no tensors between calls

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # *args/**kwargs: open_clip calls blocks as blk(x, attn_mask=...) or, under gradient
        # checkpointing, blk(x, None, None, attn_mask); pass them through unchanged.
        out = self.block(x, *args, **kwargs)
        tokens = self.context.tokens
        if tokens is None:
            raise RuntimeError(
                "CDFABlock ran without noise tokens: call the model (DSKIModel), not its visual tower"
            )
        if not self.batch_first:
            out = out.transpose(0, 1)
        n = self.num_prefix_tokens
        if out.shape[0] != tokens.shape[0] or out.shape[1] - n != tokens.shape[1]:
            raise ValueError(
                f"noise tokens {tuple(tokens.shape)} do not fit the ViT tokens {tuple(out.shape)} "
                f"({n} prefix token(s)); patch dropout is not supported with CDFA"
            )
        out = out + self.adapter(out)
        # In place on the fresh sum (autograd-safe: addition keeps no inputs for backward);
        # slicing and concatenating the prefix back cost more than the adapter itself.
        out[:, n:] += torch.tanh(self.gate).to(out.dtype) * tokens.to(out.dtype)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out


def inject_cdfa(
    visual: nn.Module, spec: CDFASpec, context: NoiseContext
) -> tuple[NoiseEncoder, tuple[int, ...]]:
    """Wrap the chosen blocks of an open_clip ``VisionTransformer`` in place; return the noise encoder."""
    transformer = getattr(visual, "transformer", None)
    resblocks = getattr(transformer, "resblocks", None)
    if not isinstance(resblocks, nn.ModuleList) or not hasattr(visual, "grid_size"):
        raise ValueError(f"CDFA needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if any(isinstance(b, CDFABlock) for b in resblocks):
        raise ValueError("CDFA is already injected into this backbone")
    grid = visual.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"CDFA expects a square token grid, got {grid}")
    width = transformer.width
    blocks = resolve_blocks(spec, len(resblocks))
    if len(resblocks) - 1 in blocks and getattr(visual, "pool_type", "tok") == "tok":
        logger.warning(
            "CDFA on the final block: its noise tokens never reach the class-token embedding",
            extra={"cdfa_blocks": blocks},
        )
    for i in blocks:
        resblocks[i] = CDFABlock(
            resblocks[i],
            width,
            spec.bottleneck,
            context,
            batch_first=getattr(transformer, "batch_first", True),
        )
    encoder = NoiseEncoder(
        width,
        grid[0],
        channels=spec.noise_channels,
        bayar_kernels=spec.bayar_kernels,
        bayar_size=spec.bayar_size,
    )
    return encoder, blocks


def cdfa_blocks(visual: nn.Module) -> Sequence[CDFABlock]:
    return [b for b in visual.transformer.resblocks if isinstance(b, CDFABlock)]
