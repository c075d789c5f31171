"""Semantic segmentation: a light FPN decoder over the multi-scale features of the (adapted) backbone.

The features come from timm's own ``forward_intermediates(x, intermediates_only=True)``, which runs the
same submodules as the classification forward, so every wrapper a method puts into the backbone (Pro-tuning's
prompt blocks, adapters, cloned tuned tensors) stays in effect. Levels taken:

- every timm model but the token families: the last 4 of timm's feature levels (``feature_info``; CNNs:
  strides 4, 8, 16, 32; Swin: its stages, fewer when the model has fewer);
- the token families (ViT, EVA, BEiT): the outputs of 4 evenly spaced blocks (e.g. 3, 6, 9, 12 of 12), as 2-D
  patch grids (all stride = patch).

Decoder (the ``head`` of a segmentation model): torchvision's ``FeaturePyramidNetwork`` (1×1 laterals,
nearest top-down path, 3×3 output convs, ``dim`` channels) → every level bilinearly upsampled to the finest
and summed → 3×3 conv-BN-ReLU → 1×1 conv to the classes → bilinear upsampling to the input size.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import VistuneError

TASKS = ("classification", "segmentation")
DECODER_DIM = 64
LEVELS = 4


def dense_indices(backbone) -> int | list[int]:
    """What ``forward_intermediates(indices=…)`` gets: the last n levels (int) or ViT block indices."""
    model = backbone.model
    if "tokens" in backbone.seams:
        depth = len(model.blocks)
        n = min(LEVELS, depth)
        return sorted({round((i + 1) * depth / n) - 1 for i in range(n)})
    return min(LEVELS, len(getattr(model, "feature_info", None) or []))


def dense_features(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """Image batch → NCHW feature maps, finest first, through the (possibly adapted) backbone."""
    return backbone.model.forward_intermediates(x, indices=dense_indices(backbone), intermediates_only=True,
                                                stop_early=True)


def dense_channels(backbone) -> list[int]:
    """Channels of each level, read off one dummy forward pass (no gradients, no RNG draws)."""
    model = backbone.model
    size = backbone.input_size()
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = dense_features(backbone, torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return [f.shape[1] for f in feats]


class FPNDecoder(nn.Module):
    """Multi-scale features (finest first) → per-pixel class logits at ``size``."""

    def __init__(self, in_channels: list[int], num_classes: int, dim: int = DECODER_DIM):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.in_channels = list(in_channels)
        self.fpn = FeaturePyramidNetwork(self.in_channels, dim)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        levels = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        finest = max((lv.shape[-2:] for lv in levels), key=lambda s: s[0] * s[1])
        y = sum(lv if lv.shape[-2:] == finest else F.interpolate(lv, size=finest, mode="bilinear", align_corners=False)
                for lv in levels)
        logits = self.classifier(self.fuse(y))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def make_decoder(backbone, num_classes: int) -> FPNDecoder:
    name = f"{backbone.spec.name!r} (a timm {type(backbone.model).__name__})"
    if not callable(getattr(backbone.model, "forward_intermediates", None)) or not dense_indices(backbone):
        raise VistuneError(f"segmentation: {name} has no forward_intermediates / feature levels in timm",
                           "use a backbone whose timm model implements forward_intermediates (most do)")
    try:
        channels = dense_channels(backbone)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise VistuneError(f"segmentation: timm's forward_intermediates of {name} fails ({type(e).__name__}: "
                           f"{str(e)[:160]})", "use another backbone for segmentation") from None
    return FPNDecoder(channels, num_classes)
