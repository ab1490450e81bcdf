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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detector.noise import BayarConv2d, SRMResidual, npr_residual
from detector.spec import CDFASpec

logger = logging.getLogger(__name__)

__all__ = [
    "BottleneckAdapter",
    "CDFABlock",
    "FoldedStem",
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


@dataclass(frozen=True)
class FoldedStem:
    """A ``"patch"`` noise stem composed with the residual filters: one strided convolution.

    ``weight`` (channels, C, P + K - 1, P + K - 1) runs on the crop reflect-padded by
    ``pad`` = K // 2 with stride P; it computes what the residual filters followed by the
    patch convolution compute, up to float rounding, in a fraction of the time.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    pad: int
    stride: int


class NoiseEncoder(nn.Module):
    """Residuals of the native-resolution crop -> (B, grid², width) tokens on the ViT grid.

    ``stem="conv"``: a 3×3 convolution over every pixel, then a strided 3×3.  ``stem="patch"``:
    one convolution with kernel = stride = ``patch``, so each output position sees exactly one
    patch of residuals; all residual filters are linear, so at inference the filters and this
    convolution fold into one (``fold``).
    """

    def __init__(
        self,
        width: int,
        grid: int,
        channels: int = 16,
        bayar_kernels: int = 3,
        bayar_size: int = 5,
        in_channels: int = 3,
        stem: str = "conv",
        patch: int = 8,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.srm = SRMResidual(in_channels, per_channel=True)
        self.bayar = BayarConv2d(in_channels, bayar_kernels, bayar_size)
        residual_channels = self.srm.out_channels + bayar_kernels + in_channels
        if stem == "conv":
            self.stem = nn.Sequential(
                nn.Conv2d(residual_channels, channels, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                nn.GELU(),
            )
        elif stem == "patch":
            if patch < 1:
                raise ValueError(f"the patch stem needs a patch size >= 1, got {patch}")
            self.stem = nn.Sequential(nn.Conv2d(residual_channels, channels, patch, stride=patch), nn.GELU())
        else:
            raise ValueError(f"unknown noise stem {stem!r}: expected 'conv' or 'patch'")
        self.stem_kind = stem
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
            filtered = F.conv2d(F.pad(noise, (p, p, p, p), mode="reflect"), self._filter_bank().to(noise.dtype))
            return torch.cat([filtered, npr_residual(noise)], dim=1)
        return torch.cat([self.srm(noise), self.bayar(noise), npr_residual(noise)], dim=1)

    def _filter_bank(self) -> torch.Tensor:
        return torch.cat([self.srm.dense_kernels(), self.bayar.constrained_weight()])

    def fold(self) -> FoldedStem | None:
        """The residual filters and a ``"patch"`` stem's convolution as one convolution, or None.

        None where they do not compose into one strided convolution: the ``"conv"`` stem (its
        non-linearity sits between two convolutions), SRM and Bayar kernels of different sizes,
        or an odd patch (NPR compares each pixel with the even-indexed pixel of its 2×2 cell,
        which a stride keeps in place only when it is even).
        """
        conv = self.stem[0]
        if self.stem_kind != "patch" or self.bayar.kernel_size != self.srm.kernel_size:
            return None
        patch = conv.stride[0]
        if patch % 2:
            return None
        with torch.no_grad():
            bank = self._filter_bank()  # (R, C, K, K)
            n_filtered = bank.shape[0]
            k = bank.shape[-1]
            pad = k // 2
            w = conv.weight.double()  # (O, R + C, P, P)
            # Filters then patch: y[o] = sum_r corr(corr(x, bank[r]), w[o, r]) = corr(x, w[o] * bank),
            # the full convolution of each patch kernel with the filters, which is what
            # conv_transpose2d computes.
            weight = F.conv_transpose2d(w[:, :n_filtered], bank.double())  # (O, C, P + K - 1, P + K - 1)
            # NPR channel of input c: x[u, v] - x[2*(u // 2), 2*(v // 2)]; in padded coordinates the
            # patch tap (a, b) reads x at (a + pad, b + pad) and subtracts it at its cell's even corner.
            npr = w[:, n_filtered:]  # (O, C, P, P)
            a = torch.arange(patch)
            even = (a // 2) * 2
            weight[:, :, pad:pad + patch, pad:pad + patch] += npr
            corner = weight.new_zeros(weight.shape)
            for i in range(patch):
                for j in range(patch):
                    corner[:, :, pad + even[i], pad + even[j]] += npr[:, :, i, j]
            weight -= corner
        bias = None if conv.bias is None else conv.bias.detach().clone()
        return FoldedStem(weight.float().contiguous(), bias, pad, patch)

    def forward(self, noise: torch.Tensor, folded: FoldedStem | None = None) -> torch.Tensor:
        """Tokens of ``noise`` (B, C, H, W); ``folded`` (from ``fold``) takes the one-convolution path."""
        if noise.dim() != 4:
            raise ValueError(f"noise crop must be (B, C, H, W), got shape {tuple(noise.shape)}")
        if folded is not None:
            p = folded.pad
            x = F.conv2d(F.pad(noise, (p, p, p, p), mode="reflect"), folded.weight.to(noise.dtype),
                         None if folded.bias is None else folded.bias.to(noise.dtype), stride=folded.stride)
            x = self.stem[1](x)
        else:
            x = self.stem(self.residuals(noise))
        if tuple(x.shape[-2:]) != (self.grid, self.grid):  # pooling to the size it has is a copy
            x = self.pool(x)  # (B, channels, grid, grid)
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
        out[:, n:].addcmul_(tokens.to(out.dtype), torch.tanh(self.gate).to(out.dtype))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out


def inject_cdfa(
    visual: nn.Module, spec: CDFASpec, context: NoiseContext, noise_crop: int
) -> tuple[NoiseEncoder, tuple[int, ...]]:
    """Wrap the chosen blocks of an open_clip ``VisionTransformer`` in place; return the noise encoder.

    ``noise_crop`` (the side of the noise branch's crop) sets the ``"patch"`` stem's patch:
    the crop divided by the token grid, so that each token sees its own patch of residuals.
    """
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
        stem=spec.noise_stem,
        patch=max(1, noise_crop // grid[0]),
    )
    return encoder, blocks


def cdfa_blocks(visual: nn.Module) -> Sequence[CDFABlock]:
    return [b for b in visual.transformer.resblocks if isinstance(b, CDFABlock)]
