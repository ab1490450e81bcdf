"""Opt-in reduced-precision inference for DSKI (``Detector.load(..., precision=...)``).

* ``fp32``: the model as trained (the default; nothing changes).
* ``bf16``: the frozen ViT (patch embedding, blocks, CDFA spatial adapters, final
  projection) is converted to bfloat16 weights; on CPUs with AMX / AVX-512 BF16
  its matmuls run about twice as fast as fp32. The noise branch (SRM, Bayar, NPR
  residuals and their stem) stays in fp32, because its residuals of neighbouring
  pixels are finer than bfloat16's 8-bit mantissa can hold; its tokens are cast
  when they are added to the patch tokens. The head (cached text embeddings,
  cosine logits) stays in fp32. ``torch.autocast`` is deliberately not used: it
  re-casts every weight on every forward and measured 4x slower than fp32.
* ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` of the Linear
  layers of the frozen blocks (the MLPs; the attention projections of
  ``nn.MultiheadAttention`` are not quantisable this way), activations in fp32.

Inference only: a converted model must not be trained or saved into a bundle.
``benchmarks/detect.py`` measures speed and score differences of each against fp32
(docs/performance.md, "Scoring").
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "int8-dynamic"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8-dynamic")

__all__ = ["PRECISIONS", "Precision", "apply_precision"]


def _frozen_blocks(model: nn.Module) -> list[nn.Module]:
    from detector.cdfa import CDFABlock

    blocks = model.backbone.visual.transformer.resblocks
    return [b.block if isinstance(b, CDFABlock) else b for b in blocks]


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Convert a loaded DSKI model (eval mode, text cache filled) in place for ``precision``; return it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    from detector.model import DSKIModel

    if not isinstance(model, DSKIModel):
        raise TypeError(f"precision {precision!r} is only available for DSKI models, "
                         f"not {type(model).__name__}")
    model.eval()
    if precision == "bf16":
        model.backbone.visual.to(torch.bfloat16)
    else:  # int8-dynamic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice towards torchao
            for block in _frozen_blocks(model):
                torch.ao.quantization.quantize_dynamic(block, {nn.Linear}, dtype=torch.qint8, inplace=True)
    model.precision = precision
    return model
