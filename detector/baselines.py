"""Baseline detectors behind the ``ForensicModel`` interface, for the comparisons of the field.

* ``UnivFDModel`` (Ojha et al., CVPR 2023): a linear probe on the frozen CLIP
  image embedding.
* ``NPRModel`` (Tan et al., CVPR 2024): a shallow ResNet (stem + two stages,
  as in the authors' code) on the NPR residual of the native-resolution crop.
* ``CNNSpotModel`` (Wang et al., CVPR 2020): a ResNet trained from scratch on
  the native-resolution crop (the authors evaluate without resizing).

The CNN baselines are deliberately small (no pretrained weights exist here and
the node runs on CPU).  They ignore ``modality``; UnivFD and the CNNs also
ignore the input they do not need (noise crop, resp. semantic view).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detector.backbone import build_backbone
from detector.model import ForensicModel
from detector.noise import npr_residual
from detector.spec import ModelSpec

__all__ = ["BasicBlock", "CNNSpotModel", "NPRModel", "SmallResNet", "UnivFDModel"]


class _FeatureClassifier(ForensicModel):
    """A baseline that scores one feature vector: the embedding is the normalised feature,
    the logits a linear layer on it."""

    def _features(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._features(semantic, noise), dim=-1)

    def embed_and_logits(
        self, semantic: torch.Tensor, noise: torch.Tensor, modality: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._features(semantic, noise)
        return F.normalize(feats, dim=-1), self._classify(feats)


class UnivFDModel(_FeatureClassifier):
    def __init__(self, spec: ModelSpec, backbone: tuple[nn.Module, Any] | None = None) -> None:
        super().__init__(spec)
        clip, _tokenizer = backbone if backbone is not None else build_backbone(spec.backbone)
        for p in clip.parameters():
            p.requires_grad_(False)
        self.backbone = clip
        with torch.no_grad():
            dim = clip.visual.proj.shape[1] if clip.visual.proj is not None else clip.visual.transformer.width
        self.embed_dim = dim
        self.probe = nn.Linear(dim, 2)
        size = clip.visual.image_size
        self.image_size: int = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.backbone.eval()

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",)

    def train(self, mode: bool = True) -> UnivFDModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def _features(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self._check_inputs(semantic, noise, self.image_size)
        with torch.no_grad():  # frozen: no graph through the ViT
            return self.backbone.encode_image(semantic).float()

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.probe(feats)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style trunk: 3×3 stem (stride 2), max-pool, one BasicBlock per stage, global pool."""

    def __init__(self, widths: Sequence[int], in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class _CropCNN(_FeatureClassifier):
    """A small ResNet on the native-resolution crop, with a linear [real, fake] head."""

    widths: tuple[int, ...] = (16, 32)

    def __init__(self, spec: ModelSpec, widths: Sequence[int] | None = None) -> None:
        super().__init__(spec)
        self.trunk = SmallResNet(tuple(widths) if widths is not None else self.widths)
        self.fc = nn.Linear(self.trunk.out_channels, 2)
        self.embed_dim = self.trunk.out_channels

    def _input(self, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _features(self, semantic: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self._check_inputs(semantic, noise, None)
        return self.trunk(self._input(noise.float()))

    def _classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class NPRModel(_CropCNN):
    widths = (16, 32)  # the authors keep only layer1 and layer2 of a ResNet-50

    def _input(self, noise: torch.Tensor) -> torch.Tensor:
        # The 2/3 factor is the authors' input scaling of the residual.
        return npr_residual(noise) * (2.0 / 3.0)


class CNNSpotModel(_CropCNN):
    widths = (16, 32, 64)

    def _input(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * 2.0 - 1.0
