"""Pro-tuning (Nie et al., 2022): stage-wise, input-dependent prompt blocks in a frozen backbone.

No public code exists and only the abstract was readable, so this is the library's reading of the
paper. At each insertion point a small prompt block reads the frozen features there and adds a
prompt back: y ← y + P(y), with P = 1×1 conv (C → C/r) → depthwise k×k conv (spatial context, so
the prompt at a position depends on its neighbourhood) → GELU → 1×1 conv (C/r → C). The last conv
is zero-initialised, so at step 0 the adapted model computes exactly the frozen one.

Insertion points: any timm model without a family view (CNNs, hybrids, MetaFormers, MaxViT, ...)
— the output of every stage (the generic view's stages, from timm's ``feature_info``), on its NCHW or
NHWC feature map; stages that output token sequences of unknown spatial order (Hiera, LeViT, CaiT)
are refused. ViT, EVA, BEiT — the input of blocks 1, k+1, 2k+1, … (so the first prompt acts on the
patch embeddings, and no prompt sits after the last block, where a CLS-pooled model would never read
it), on the patch tokens laid out as their 2-D grid (prefix tokens are left alone); Swin V1/V2 — the
same blocks, on their NHWC feature maps. ``stages`` picks a subset of these points. Tuned params per point: C·h + h + h·k² + h + h·C + C with h = max(1, C // r).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones.base import replace_module
from ..errors import VistuneError
from .base import MethodConfig, ModuleTuner, check_at_most, option, register


@dataclass
class ProTuningConfig(MethodConfig):
    reduction: int = option(4, "prompt block width: hidden channels = C // reduction")
    kernel_size: int = option(3, "depthwise conv kernel of the prompt block (odd; 1 = no spatial context)")
    every: int = option(3, "transformers: a prompt block before blocks 1, k+1, 2k+1, … (others: after every stage)")
    stages: str = option("all", "which insertion points get a block: 'all' or a comma list of indices, e.g. 2,3")

    def validate(self):
        if self.reduction < 1 or self.every < 1:
            raise VistuneError(f"pro-tuning: reduction={self.reduction} and every={self.every} must be ≥ 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise VistuneError(f"pro-tuning: kernel_size={self.kernel_size} must be odd and ≥ 1",
                               "use --set kernel_size=3")
        check_at_most("pro-tuning", "kernel_size", self.kernel_size, 31,
                      "a kernel wider than the last feature maps of a backbone", 3)
        if self.stages != "all" and not all(s.strip().isdigit() for s in self.stages.split(",")):
            raise VistuneError(f"pro-tuning: stages={self.stages!r} is not 'all' or a list of indices",
                               "use e.g. --set stages=2,3")


class PromptBlock(nn.Module):
    """NCHW features → a prompt of the same shape: 1×1 reduce, depthwise k×k, GELU, 1×1 expand (zero init)."""

    def __init__(self, dim: int, reduction: int, kernel_size: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.spatial = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.act = nn.GELU()
        self.expand = nn.Conv2d(hidden, dim, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.act(self.spatial(self.reduce(x))))


class Prompted(nn.Module):
    """A frozen module with a prompt added to its output (``after``: stages) or to its input (transformer
    blocks), in that tensor's own layout."""

    def __init__(self, inner: nn.Module, prompt: PromptBlock, layout: Literal["nchw", "nhwc", "tokens"],
                 num_prefix_tokens: int = 0, grid: tuple[int, int] | None = None, after: bool = False):
        super().__init__()
        self.inner, self.prompt, self.layout, self.after = inner, prompt, layout, after
        self.num_prefix_tokens, self.grid = num_prefix_tokens, grid

    def forward(self, x, *args, **kwargs):
        if self.after:
            return self.add_prompt(self.inner(x, *args, **kwargs))
        return self.inner(self.add_prompt(x), *args, **kwargs)

    def add_prompt(self, y: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return y + self.prompt(y)
        if self.layout == "nhwc":
            return y + self.prompt(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        n, (h, w) = self.num_prefix_tokens, self.grid
        patches = y[:, n:]
        if patches.shape[1] != h * w:
            raise VistuneError(f"pro-tuning: {patches.shape[1]} patch tokens do not form the {h}×{w} grid",
                               "train and run at the backbone's image size")
        grid = patches.transpose(1, 2).reshape(y.shape[0], -1, h, w)
        prompt = self.prompt(grid).flatten(2).transpose(1, 2)
        return torch.cat([y[:, :n], patches + prompt], dim=1)


@register("pro-tuning", category="prompt",
          description="Pro-tuning (our reading): input-dependent prompt blocks (1x1-dw kxk-1x1 conv, zero-init) "
                      "added at every stage output / before every k-th transformer block")
class ProTuning(ModuleTuner):
    Config = ProTuningConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # the own ViT: 0.05 reached 0.89 of the best (0.1) on mnist5k, 0.1 ≥ 0.94 on its three tasks measured
    default_lrs_by_family = {"vit": {"adamw": 0.1}}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def attach(self):
        backbone, config = self.backbone, self.config
        if not backbone.transformer:
            points = backbone.stages()
            layouts = backbone.layouts(points)
            for name, found in zip(backbone.module_names(points), layouts):
                if found is None or found.kind == "tokens":
                    raise VistuneError(
                        f"pro-tuning: stage {name} of {backbone.spec.name!r} outputs "
                        f"{'no single tensor' if found is None else 'a token sequence'}, not a 2-D feature map, so "
                        "a spatial prompt block has no grid to read",
                        "use another method on this backbone (adapter, lora, ssf, bias, ...)")
            dims, kinds = [found.channels for found in layouts], [found.kind for found in layouts]
        else:
            blocks = backbone.blocks()
            points = blocks[::config.every]
            if "tokens" not in backbone.seams:  # Swin: NHWC maps in and out of each block
                dims, kinds = [blk.norm1.normalized_shape[0] for blk in points], ["nhwc"] * len(points)
            else:
                dims, kinds = [backbone.embed_dim] * len(points), ["tokens"] * len(points)
        chosen = self._chosen(len(points))
        names = backbone.module_names(points)
        model = backbone.model
        for i in chosen:
            block = PromptBlock(dims[i], config.reduction, config.kernel_size)
            extra = {"after": not backbone.transformer}
            if kinds[i] == "tokens":
                extra.update(num_prefix_tokens=backbone.num_prefix_tokens, grid=tuple(model.patch_embed.grid_size))
            replace_module(model, names[i], Prompted(model.get_submodule(names[i]), block, kinds[i], **extra))
        self.prompt_points = chosen

    def _chosen(self, n: int) -> list[int]:
        if self.config.stages == "all":
            return list(range(n))
        chosen = sorted({int(s) for s in self.config.stages.split(",")})
        if chosen[-1] >= n:
            raise VistuneError(
                f"pro-tuning: stages={self.config.stages} but {self.backbone.spec.name!r} has {n} insertion points "
                f"(0–{n - 1})", f"use indices below {n}, or stages=all",
            )
        return chosen
