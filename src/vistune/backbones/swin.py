"""View over timm's SwinTransformer (hierarchical window attention, NHWC stages)."""
from __future__ import annotations

from torch import nn

from .base import BackboneView


class SwinView(BackboneView):
    family = "swin"

    def stages(self) -> list[nn.Module]:
        return list(self.model.layers)

    def stage_dims(self) -> list[int]:
        return [stage.dim for stage in self.model.layers]

    def blocks(self) -> list[nn.Module]:
        return [blk for stage in self.model.layers for blk in stage.blocks]

    def final_modules(self) -> dict[str, nn.Module]:
        return {"norm": self.model.norm}
