"""Convpass (Jie & Deng, 2022, "Convolutional Bypasses Are Better Vision Transformer Adapters").

Per block, a convolutional bypass beside the attention and another beside the MLP, each reading that
sub-layer's (normalised) input h and added to its output:
    x = x + Attn(LN₁(x)) + s · C₁(LN₁(x));   x = x + MLP(LN₂(x)) + s · C₂(LN₂(x))
    C(h) = up(dropout(act(conv3×3(act(down(h))))))   (down: D → h 1×1, conv: h → h 3×3 on the patch grid, up: h → D)
with act = QuickGELU, as the official code (JieShibo/PETL-ViT ``convpass/vtab/convpass.py``: ``forward_block``,
``Convpass``; dim 8, dropout 0.1; down Xavier-uniform, up zeros, the 3×3 conv the identity at its centre tap —
the code's ``xavier_init=False``, chosen for 10 of its 19 VTAB tasks; ``--set conv_init=xavier`` is the other).
The code's scale s is chosen per task from {0.01, 0.1, 1, 10, 100} (its configs: 1 and 0.1 most often); the
default is 1 (``set_Convpass``'s default). The patch tokens are laid out as their 2-D grid for the conv; each
prefix token (CLS, registers, DeiT's distillation token) goes through the same conv as a 1×1 image, as the
official code treats the CLS — with zero padding only the kernel's centre tap and bias reach it.

Token families only (the ``tokens`` seam: ViT, DeiT, EVA, BEiT), where the patch tokens form the grid of
``patch_embed``: Swin's window attention reads window partitions, not the map (the official Swin variant
rewrites the block's forward), and CNNs are convolutional already — both are refused. The bypass sits inside the
block's LayerScale / drop-path where a block has them (none on ViT-B). Step 0 is exactly the frozen model.

Tuned parameters per block: 2 · (D·h + h + 9h² + h + h·D + D): ViT-B/16, h = 8: 12 · 27,296 = 327,552.
Recipe of the official code: AdamW lr 1e-3 at batch 64 (vistune: base lr 4e-3 × batch/256), weight decay 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VistuneError
from .adapter_common import Beside, Branch, QuickGELU, branches, dataflow
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class ConvpassConfig(MethodConfig):
    bottleneck: int = option(8, "channels h of the bypass's 3×3 conv (official 8)")
    scale: float = option(1.0, "s: the bypass output is multiplied by s (official: per task from 0.01-100)")
    conv_init: Literal["identity", "xavier"] = option(
        "identity", "the 3×3 conv's init: identity = zeros but the identity at the centre tap (official default); "
                    "xavier = Xavier-uniform")
    dropout: float = option(0.1, "dropout before the up-projection while training (official 0.1)")

    def validate(self):
        if self.bottleneck < 1:
            raise VistuneError(f"convpass: bottleneck={self.bottleneck} must be ≥ 1", "e.g. --set bottleneck=8")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"convpass: dropout={self.dropout} must be in [0, 1)", "e.g. --set dropout=0.1")


class ConvBypass(Branch):
    """Tokens (B, N, D) → s · up(dropout(act(conv(act(down(tokens)))))), the conv on the patch-token grid."""

    def __init__(self, dim: int, hidden: int, num_prefix_tokens: int, grid: tuple[int, int], scale: float,
                 conv_init: str, dropout: float):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.num_prefix_tokens, self.grid, self.scale = num_prefix_tokens, grid, scale
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.conv.bias)
        if conv_init == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, (h, w) = self.num_prefix_tokens, self.grid
        z = self.act(self.down(tokens))
        prefix, patches = z[:, :n], z[:, n:]
        if patches.shape[1] != h * w:
            raise VistuneError(f"convpass: {patches.shape[1]} patch tokens do not form the {h}×{w} grid",
                               "train and run at the backbone's image size")
        grid = self.conv(patches.transpose(1, 2).reshape(z.shape[0], -1, h, w)).flatten(2).transpose(1, 2)
        centre = self.conv.weight[:, :, 1, 1]  # a prefix token as a zero-padded 1×1 image sees only the centre tap
        z = torch.cat([F.linear(prefix, centre, self.conv.bias), grid], dim=1)
        return self.up(self.dropout(self.act(z))) * self.scale

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}, scale={self.scale}"


@register("convpass", category="adapter", needs=("tokens",),
          description="Convpass: a 1x1-3x3-1x1 convolutional bypass (on the patch grid) beside the attention and the "
                      "MLP of every block (h=8)")
class Convpass(ModuleTuner):
    Config = ConvpassConfig
    default_optimizer = "adamw"
    # measured (docs/defaults.md): the official AdamW 1e-3 at batch 64 (base 4e-3) is a 100-epoch recipe and reached
    # 0.60 of the grid's best in a 4-epoch run; 0.05 is the lowest grid lr that reached ≥ 90 %
    default_lrs = {"adamw": 0.05}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def attach(self):
        backbone, config = self.backbone, self.config
        grid = tuple(backbone.model.patch_embed.grid_size)
        blocks = backbone.blocks()
        calls = dataflow(backbone, [m for b in blocks for m in (b.attn, b.mlp)])
        for i, block in enumerate(blocks):
            for slot, call in (("attn", calls[2 * i]), ("mlp", calls[2 * i + 1])):
                if call.input is None or call.input.ndim != 3:
                    raise VistuneError(
                        f"convpass: {slot} of block {i} of {backbone.spec.name!r} does not read the token sequence "
                        "(B, N, D) as a module call, so there is no input for a bypass beside it",
                        "use a backbone built from timm's ViT/EVA/BEiT blocks, or another method")
                branch = ConvBypass(call.input.shape[-1], config.bottleneck, backbone.num_prefix_tokens, grid,
                                    config.scale, config.conv_init, config.dropout)
                setattr(block, slot, Beside(getattr(block, slot), branch))

    def backbone_train_modules(self) -> list[nn.Module]:
        return branches(self.backbone.model)
