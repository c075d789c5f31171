"""VPT "pad" prompts for any backbone (the VPT repo's prompting of ResNet/ConvNeXt): a learnable
border of width w around the input image.

Our choice, as the official code: the image is shrunk to (S − 2w)² and the border fills the canvas
back to S², so the backbone sees the same input size and costs exactly as much as without prompts
(``canvas=grow`` instead keeps the image at S² and pads to (S + 2w)²). The border is in the
normalised-input space the backbone sees. Tuned params: shrink 3·(S² − (S−2w)²); grow 3·((S+2w)² − S²).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VistuneError
from ..backbones.input_size import MAX_IMAGE_SIZE
from .base import InputTuner, MethodConfig, check_at_most, option, register


@dataclass
class VPTPadConfig(MethodConfig):
    width: int = option(8, "border width w in pixels")
    canvas: Literal["shrink", "grow"] = option(
        "shrink", "shrink: image resized to S-2w, border fills to S (same cost); grow: border around S → S+2w"
    )
    image_size: int | None = option(None, "input size S (set from the training image size)")

    def validate(self):
        if self.width < 1:
            raise VistuneError(f"vpt-pad: width={self.width} must be ≥ 1")
        check_at_most("vpt-pad", "width", self.width, MAX_IMAGE_SIZE // 2, "a border as wide as the largest input", 8)
        if self.image_size is not None:
            if self.image_size < 1:
                raise VistuneError(f"vpt-pad: image_size={self.image_size} must be ≥ 1 (or none: the training size)")
            check_at_most("vpt-pad", "image_size", self.image_size, MAX_IMAGE_SIZE, "vistune's largest input size",
                          224)
        if self.image_size is not None and self.canvas == "shrink" and 2 * self.width >= self.image_size:
            raise VistuneError(
                f"vpt-pad: a border of width {self.width} leaves no room for a {self.image_size}px image",
                f"use --set width={max(1, self.image_size // 8)} or canvas=grow",
            )


@register("vpt-pad", category="prompt",
          description="VPT pad prompts: a learnable pixel border around the (shrunk) input image, any backbone")
class VPTPad(InputTuner):
    Config = VPTPadConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    # base lr (× batch/256): 0.05 reached 0.90 of the best (0.1) on the own ViT; the CNNs are best at 0.02–0.05
    default_lrs = {"adamw": 0.1}
    default_lrs_by_family = {"generic": {"adamw": 0.05}}

    def attach(self):
        config = self.config
        if config.image_size is None:
            raise VistuneError("vpt-pad needs the input image size", "pass --image-size (or --set image_size=S)")
        w, s = config.width, config.image_size
        inner = s - 2 * w if config.canvas == "shrink" else s
        outer = inner + 2 * w
        self.inner_size = inner
        # top/bottom strips span the full width; left/right strips the inner height
        self.pad_tb = nn.Parameter(torch.zeros(1, 3, 2 * w, outer))
        self.pad_lr = nn.Parameter(torch.zeros(1, 3, inner, 2 * w))
        nn.init.normal_(self.pad_tb, std=0.02)
        nn.init.normal_(self.pad_lr, std=0.02)

    def prompt(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.config.width, x.shape[0]
        if x.shape[-2:] != (self.inner_size, self.inner_size):
            x = F.interpolate(x, size=(self.inner_size, self.inner_size), mode="bilinear", align_corners=False,
                              antialias=True)
        lr, tb = self.pad_lr.expand(b, -1, -1, -1), self.pad_tb.expand(b, -1, -1, -1)
        x = torch.cat([lr[..., :w], x, lr[..., w:]], dim=3)
        return torch.cat([tb[:, :, :w], x, tb[:, :, w:]], dim=2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(self.prompt(x))
