"""Adapter (Pfeiffer placement): after the FFN, before its residual, x + up(act(down(x))).

Transformer views (ViT, EVA, BEiT, Swin V1/V2): each block's ``mlp`` is wrapped, so the adapter
sees the FFN output. Every other timm model (the generic view: CNNs, hybrids, MetaFormers, ...):
a bottleneck adapter after every residual block of the stages timm's ``feature_info`` names — 1×1
convs on NCHW feature maps, Linears on channels-last maps and token sequences; the block widths and
layouts are read off one dummy forward pass.

The official VPT code zero-initialises down AND up, so only up.bias ever learns; ``init=vpt``
reproduces that, the default ``init=learn`` (down: Xavier, up: zeros) starts as the identity
and learns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones.base import replace_module
from ..errors import VistuneError
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class AdapterConfig(MethodConfig):
    reduction: int = option(8, "bottleneck reduction r: hidden width = D // r (paper grid 8, 64, 256)")
    init: Literal["learn", "vpt"] = option(
        "learn", "learn: down Xavier, up zeros (identity at start, learns); vpt: official all-zeros init"
    )

    def validate(self):
        if self.reduction < 1:
            raise VistuneError(f"adapter: reduction={self.reduction} must be ≥ 1")


class Bottleneck(nn.Module):
    """x + up(GELU(down(x))) over the last (token) or channel (conv) dimension."""

    def __init__(self, dim: int, reduction: int, init: str, conv: bool):
        super().__init__()
        hidden = max(1, dim // reduction)
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.down, self.act, self.up = layer(dim, hidden), nn.GELU(), layer(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)
        if init == "vpt":
            nn.init.zeros_(self.down.weight)
        else:
            nn.init.xavier_uniform_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedOutput(nn.Module):
    """Runs a frozen module, then an adapter on its output."""

    def __init__(self, inner: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x, *args, **kwargs):
        return self.adapter(self.inner(x, *args, **kwargs))


@register("adapter", category="adapter",
          description="Pfeiffer adapter after each FFN (transformers) or a bottleneck after each block (any timm model)")
class Adapter(ModuleTuner):
    Config = AdapterConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def attach(self):
        backbone, config = self.backbone, self.config
        if not backbone.transformer:
            blocks = backbone.blocks()
            names = backbone.module_names(blocks)
            layouts = backbone.layouts(blocks)
            if None in layouts:
                raise VistuneError(
                    f"adapter: block {names[layouts.index(None)]} of {backbone.spec.name!r} does not output one "
                    "feature map or token tensor, so there is no place for an adapter after it",
                    "use another method on this backbone (lora, ssf, bias, pro-tuning, ...)")
            for name, layout in zip(names, layouts):
                bottleneck = Bottleneck(layout.channels, config.reduction, config.init, layout.kind == "nchw")
                replace_module(backbone.model, name, AdaptedOutput(backbone.model.get_submodule(name), bottleneck))
        else:
            for block in backbone.blocks():
                dim = block.mlp.fc2.out_features
                block.mlp = AdaptedOutput(block.mlp, Bottleneck(dim, config.reduction, config.init, False))
