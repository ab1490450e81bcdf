"""Vision-language head: per-modality class prompts with learnable context (CoOp).

For every modality in ``spec.modalities`` two prompts, ``real_template`` and
``fake_template`` (e.g. "a real CT image" / "an AI-generated CT image"), go
through the frozen CLIP text tower with ``context_tokens`` learnable vectors
inserted right after the start-of-text token (shared by all prompts, as in
CoOp's unified context).  Logits are ``scale · cos(image, text)`` against the
two prompts of the image's own modality: (B, 2) = [real, fake].

Training runs the text tower live (the context vectors get gradients);
``cache_text_embeddings()`` stores all class embeddings in a buffer so that
inference in eval mode never runs the text tower.  Switching back to train
mode invalidates the cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from detector.spec import HeadSpec

__all__ = ["TextTower", "VisionLanguageHead", "modality_index"]

MAX_LOGIT_SCALE = 100.0
_PLACEHOLDER = "X"  # one BPE token each; their embeddings are replaced by the context vectors


def modality_index(modalities: Sequence[str], name: str | None) -> int:
    """Index of a DICOM modality in ``modalities``; unknown names map to the last entry."""
    key = (name or "").strip().upper()
    for i, m in enumerate(modalities):
        if m.upper() == key:
            return i
    return len(modalities) - 1


class TextTower:
    """Runs open_clip's frozen text encoder from token embeddings (``encode_text`` with an embedding input).

    A plain object holding a reference to the CLIP model, so the text weights
    are not registered twice in the state dict (they belong to the backbone).
    """

    def __init__(self, clip: nn.Module) -> None:
        src = getattr(clip, "text", None)
        src = src if src is not None else clip
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(src, attr):
                raise ValueError(
                    f"{type(clip).__name__} has no open_clip text transformer ({attr} missing); "
                    "the DSKI head needs one"
                )
        if getattr(src, "cls_emb", None) is not None:
            raise ValueError("text towers with an appended class token (CoCa) are not supported")
        self._src = src

    @property
    def width(self) -> int:
        return self._src.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self._src.positional_embedding.shape[0]

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._src.token_embedding(tokens)

    def encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` from (N, L, W) token embeddings; ``tokens`` (N, L) locate the pooled token."""
        src = self._src
        cast_dtype = src.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + src.positional_embedding.to(cast_dtype)
        x = src.transformer(x, attn_mask=src.attn_mask)
        x = src.ln_final(x)
        eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))
        pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        x = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
        proj = src.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x


class VisionLanguageHead(nn.Module):
    def __init__(self, spec: HeadSpec, clip: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        if not spec.modalities:
            raise ValueError("head.modalities must name at least one modality")
        self.spec = spec
        self.modalities: tuple[str, ...] = tuple(spec.modalities)
        self.text = TextTower(clip)
        n_ctx = spec.context_tokens
        prompts = [
            template.format(modality=m)
            for m in self.modalities
            for template in (spec.real_template, spec.fake_template)
        ]
        prefix = " ".join([_PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {p}" if n_ctx else p for p in prompts]
        tokens = tokenizer(texts)
        if tokens.shape[1] != self.text.context_length:
            raise ValueError(
                f"tokenizer context length {tokens.shape[1]} != text tower's {self.text.context_length}"
            )
        # A truncated prompt loses its end-of-text token, which the text pooling needs.
        lengths = (tokens != 0).sum(dim=1)
        if int(lengths.max()) >= tokens.shape[1]:
            longest = prompts[int(lengths.argmax())]
            raise ValueError(
                f"prompt {longest!r} with {n_ctx} context tokens does not fit the text "
                f"context length {tokens.shape[1]}"
            )
        self.register_buffer("prompt_tokens", tokens, persistent=False)  # (2M, L)
        with torch.no_grad():
            embed_dim = self.text.encode(self.text.token_embedding(tokens[:1]), tokens[:1]).shape[-1]
        self.embed_dim = embed_dim
        # CoOp initialises generic context with N(0, 0.02).
        self.context = nn.Parameter(torch.randn(n_ctx, self.text.width) * 0.02)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(spec.init_logit_scale)))
        # Persistent, so a bundle carries the cache; valid flag guards against stale values.
        self.register_buffer("text_cache", torch.zeros(len(self.modalities), 2, embed_dim))
        self.register_buffer("text_cache_valid", torch.tensor(False))

    # ----------------------------------------------------------------- text side
    def modality_index(self, name: str | None) -> int:
        return modality_index(self.modalities, name)

    def modality_indices(self, names: Sequence[str | None]) -> torch.Tensor:
        return torch.tensor([self.modality_index(n) for n in names], dtype=torch.long)

    def live_text_embeddings(self, modalities: torch.Tensor | None = None) -> torch.Tensor:
        """(K, 2, D) L2-normalised class embeddings of the given modality indices (all when None)."""
        if modalities is None:
            modalities = torch.arange(len(self.modalities), device=self.prompt_tokens.device)
        rows = torch.stack([2 * modalities, 2 * modalities + 1], dim=1).flatten()
        tokens = self.prompt_tokens[rows]
        emb = self.text.token_embedding(tokens)
        n_ctx = self.context.shape[0]
        if n_ctx:
            ctx = self.context.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
            emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + n_ctx :]], dim=1)
        feats = F.normalize(self.text.encode(emb, tokens).float(), dim=-1)
        return feats.view(-1, 2, feats.shape[-1])

    @torch.no_grad()
    def cache_text_embeddings(self) -> torch.Tensor:
        """Compute every class embedding once; eval-mode forwards then skip the text tower."""
        self.text_cache.copy_(self.live_text_embeddings())
        self.text_cache_valid.fill_(True)
        return self.text_cache

    def clear_text_cache(self) -> None:
        self.text_cache_valid.fill_(False)

    def train(self, mode: bool = True) -> VisionLanguageHead:
        if mode:
            self.clear_text_cache()  # the context is about to change
        return super().train(mode)

    def text_embeddings(self, modality: torch.Tensor) -> torch.Tensor:
        """(B, 2, D) class embeddings for each sample's modality index."""
        if not self.training and bool(self.text_cache_valid):
            return self.text_cache[modality]
        unique, inverse = torch.unique(modality, return_inverse=True)
        return self.live_text_embeddings(unique)[inverse]

    # ----------------------------------------------------------------- logits
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, image_embedding: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) image embeddings (any norm) and (B,) modality indices -> (B, 2) [real, fake] logits."""
        b = image_embedding.shape[0]
        if modality is None:
            modality = torch.full((b,), len(self.modalities) - 1, dtype=torch.long)
        modality = modality.to(device=image_embedding.device, dtype=torch.long)
        if modality.shape != (b,):
            raise ValueError(f"modality must be ({b},), got {tuple(modality.shape)}")
        if b:
            lowest, highest = torch.aminmax(modality)
            if int(lowest) < 0 or int(highest) >= len(self.modalities):
                raise ValueError(f"modality indices must lie in [0, {len(self.modalities)})")
        img = F.normalize(image_embedding.float(), dim=-1)
        text = self.text_embeddings(modality)  # (B, 2, D)
        # bmm rather than einsum: the same products, without einsum's per-call planning (a
        # fifth of the head's time at the default bundle's size)
        return self.logit_scale() * torch.bmm(text, img.unsqueeze(-1)).squeeze(-1)
