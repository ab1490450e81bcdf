"""The scoring interface shared by DSKI and the baselines, and the DSKI model itself.

Inputs, as produced by ``detector.preprocess``:

* ``semantic``: (B, 3, S, S) float32, CLIP-normalised, resized to the backbone size;
* ``noise``: (B, 3, C, C) float32 in [0, 1], native-resolution crop, never resized;
* ``modality``: (B,) long indices into ``spec.head.modalities`` (see
  ``modality_indices``), or None, which means "unknown" (the last entry).

Outputs: logits (B, 2) ordered [real, fake]; embeddings (B, D), L2-normalised,
the space the retrieval module (MFRM) indexes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detector.backbone import build_backbone
from detector.cdfa import CDFABlock, FoldedStem, NoiseContext, inject_cdfa
from detector.head import VisionLanguageHead, modality_index
from detector.spec import ModelSpec

__all__ = ["DSKIModel", "ForensicModel", "frozen_state_prefixes"]


class ForensicModel(nn.Module):
    """Base class: ``forward == logits``; subclasses implement ``embed`` and ``embed_and_logits``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec

    # ------------------------------------------------------------ to implement
    def embed(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised embedding."""
        raise NotImplementedError

    def embed_and_logits(
        self, semantic: torch.Tensor, noise: torch.Tensor, modality: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass of the network (what scoring with retrieval needs)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared API
    def logits(
        self, semantic: torch.Tensor, noise: torch.Tensor, modality: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.embed_and_logits(semantic, noise, modality)[1]

    def forward(
        self, semantic: torch.Tensor, noise: torch.Tensor, modality: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.logits(semantic, noise, modality)

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict keys of pretrained frozen weights: entries ending in "." are prefixes,
        the others exact keys (use ``is_frozen_key``).  Empty when nothing is pretrained."""
        return ()

    def is_frozen_key(self, key: str) -> bool:
        return any(key == p or (p.endswith(".") and key.startswith(p)) for p in self.frozen_prefixes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def modality_index(self, name: str | None) -> int:
        return modality_index(self.spec.head.modalities, name)

    def modality_indices(self, names: Sequence[str | None]) -> torch.Tensor:
        return torch.tensor([self.modality_index(n) for n in names], dtype=torch.long)

    def prepare_inference(self) -> ForensicModel:
        """Eval mode plus any inference-only caches; call after loading weights."""
        return self.eval()

    def _check_inputs(self, semantic: torch.Tensor, noise: torch.Tensor, semantic_size: int | None) -> None:
        if semantic.dim() != 4 or semantic.shape[1] != 3:
            raise ValueError(f"semantic view must be (B, 3, S, S), got {tuple(semantic.shape)}")
        if noise.dim() != 4 or noise.shape[1] != 3:
            raise ValueError(f"noise crop must be (B, 3, C, C), got {tuple(noise.shape)}")
        if semantic.shape[0] != noise.shape[0]:
            raise ValueError(f"batch sizes differ: semantic {semantic.shape[0]}, noise {noise.shape[0]}")
        if semantic_size is not None and tuple(semantic.shape[-2:]) != (semantic_size, semantic_size):
            raise ValueError(
                f"semantic view must be {semantic_size}x{semantic_size} for this backbone, "
                f"got {tuple(semantic.shape[-2:])}"
            )


def frozen_state_prefixes(module: nn.Module, prefix: str) -> list[str]:
    """Prefixes / exact keys under ``prefix`` that hold frozen open_clip weights, CDFA excluded."""
    if isinstance(module, CDFABlock):
        return [f"{prefix}.block."]
    if not any(isinstance(m, CDFABlock) for m in module.modules()):
        return [f"{prefix}."]
    out = [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
    out += [
        f"{prefix}.{n}"
        for n, b in module.named_buffers(recurse=False)
        if b is not None and n not in module._non_persistent_buffers_set
    ]
    for name, child in module.named_children():
        out += frozen_state_prefixes(child, f"{prefix}.{name}")
    return out


class DSKIModel(ForensicModel):
    """Frozen open_clip backbone + CDFA (spatial adapters, noise branch) + vision-language head."""

    def __init__(self, spec: ModelSpec, backbone: tuple[nn.Module, Any] | None = None) -> None:
        super().__init__(spec)
        clip, tokenizer = backbone if backbone is not None else build_backbone(spec.backbone)
        for p in clip.parameters():
            p.requires_grad_(False)
        self.backbone = clip
        # Per-model, per-thread slot through which the CDFA blocks see this forward's noise tokens.
        self._noise_context = NoiseContext()
        # The noise stem folded into one convolution (prepare_inference); None while training.
        self._folded_stem: FoldedStem | None = None
        self.register_load_state_dict_pre_hook(self._drop_folded_stem)
        self.noise_encoder, self.cdfa_block_indices = inject_cdfa(
            clip.visual, spec.cdfa, self._noise_context, spec.noise_crop
        )
        self.head = VisionLanguageHead(spec.head, clip, tokenizer)
        size = clip.visual.image_size
        self.image_size: int = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.backbone.eval()

    @property
    def embed_dim(self) -> int:
        return self.head.embed_dim

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(frozen_state_prefixes(self.backbone, "backbone"))

    def cdfa_blocks(self) -> list[CDFABlock]:
        return [self.backbone.visual.transformer.resblocks[i] for i in self.cdfa_block_indices]

    def train(self, mode: bool = True) -> DSKIModel:
        super().train(mode)
        if mode:
            self._folded_stem = None  # the weights are about to change
        # The frozen backbone always runs as at inference (no patch dropout); only adapters train.
        self.backbone.eval()
        for blk in self.cdfa_blocks():
            blk.adapter.train(mode)
        return self

    def prepare_inference(self) -> DSKIModel:
        self.eval()
        self.head.cache_text_embeddings()
        self._folded_stem = self.noise_encoder.fold()
        return self

    def _drop_folded_stem(self, *_: Any) -> None:
        self._folded_stem = None  # computed from weights that are about to be replaced

    def _apply(self, fn: Any, recurse: bool = True) -> DSKIModel:
        # The folded stem is a plain attribute, not a parameter or buffer, so .to(), .cuda() and
        # .double() would leave it behind on the old device: fold again from the moved weights.
        super()._apply(fn, recurse)
        if self._folded_stem is not None:
            self._folded_stem = self.noise_encoder.fold()
        return self

    def noise_tokens(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise branch's tokens, (B, grid², width), folded after ``prepare_inference``."""
        return self.noise_encoder(noise, self._folded_stem)

    def image_embedding(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The adapted CLIP image embedding, (B, D), not normalised."""
        self._check_inputs(semantic, noise, self.image_size)
        return self.adapted_embedding(semantic, self.noise_tokens(noise))

    def adapted_embedding(self, semantic: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The adapted ViT's embedding, (B, D), for noise ``tokens`` from ``noise_encoder``."""
        # The ViT may run in another dtype than its fp32 input (``detector.precision``, bf16).
        semantic = semantic.to(self.backbone.visual.conv1.weight.dtype)
        with self._noise_context.bind(tokens):
            return self.backbone.visual(semantic)

    def embed(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_embedding(semantic, noise).float(), dim=-1)

    def embed_and_logits(
        self, semantic: torch.Tensor, noise: torch.Tensor, modality: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(semantic, noise)
        return emb, self.head(emb, modality)
