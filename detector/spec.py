"""What a detector model is made of: the specification stored in every bundle manifest.

``build_model(spec)`` in ``detector.methods`` turns a ``ModelSpec`` into a
``ForensicModel``; the same spec, saved in the manifest, rebuilds it at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["dski", "univfd", "npr", "cnnspot"]
CLIP_METHODS: frozenset[str] = frozenset({"dski", "univfd"})  # methods built on the open_clip backbone

DEFAULT_MODALITIES: tuple[str, ...] = ("CT", "MR", "CR", "DX", "US", "MG", "PT", "NM", "XA", "OT")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(_Strict):
    name: str = "dski-tiny"                # an open_clip model name (built-in or registered in detector.tiny)
    checkpoint: Path | None = None         # local open_clip checkpoint; None only for the tiny random backbones
    checkpoint_sha256: str | None = None   # recorded at training time, verified at load time
    image_size: int = Field(64, ge=16)     # semantic view size; must match the open_clip config


class CDFASpec(_Strict):
    blocks: tuple[int, ...] | None = None  # transformer block indices; None: `num_blocks` evenly spaced
    num_blocks: int = Field(3, ge=1)
    bottleneck: int = Field(16, ge=1)
    noise_channels: int = Field(16, ge=1)  # width of the noise-domain patch embedding stem
    bayar_kernels: int = Field(3, ge=1)
    bayar_size: int = Field(5, ge=3)
    # How the residuals become one feature vector per ViT patch (detector.cdfa.NoiseEncoder):
    # "conv", a 3x3 convolution at full resolution then a strided 3x3, pooled to the grid;
    # "patch", one convolution with kernel = stride = noise crop / grid, which at inference
    # folds with the residual filters into a single strided convolution (a backbone as small
    # as dski-tiny would otherwise spend as much arithmetic on its noise branch as on itself).
    noise_stem: Literal["conv", "patch"] = "conv"


class HeadSpec(_Strict):
    context_tokens: int = Field(4, ge=0)
    real_template: str = "a real {modality} image"
    fake_template: str = "an AI-generated {modality} image"
    modalities: tuple[str, ...] = DEFAULT_MODALITIES  # the last entry catches unknown modalities
    init_logit_scale: float = 1 / 0.07


class ModelSpec(_Strict):
    method: Method = "dski"
    backbone: BackboneSpec = BackboneSpec()
    cdfa: CDFASpec = CDFASpec()
    head: HeadSpec = HeadSpec()
    noise_crop: int = Field(64, ge=8)      # side of the native-resolution crop seen by the noise branch
