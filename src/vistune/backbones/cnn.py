"""View over timm CNNs: EfficientNet/MobileNet (timm ``EfficientNet``/``MobileNetV3``),
ResNet and ConvNeXt. The per-architecture differences are only which attribute holds the
stages and which modules follow them."""
from __future__ import annotations

import torch
from torch import nn

from .base import BackboneView


class CNNView(BackboneView):
    family = "cnn"

    def stages(self) -> list[nn.Module]:
        m = self.model
        if hasattr(m, "layer4"):  # ResNet
            return [m.layer1, m.layer2, m.layer3, m.layer4]
        if hasattr(m, "stages"):  # ConvNeXt
            return list(m.stages)
        return list(m.blocks)  # EfficientNet, MobileNet

    def blocks(self) -> list[nn.Module]:
        out = []
        for stage in self.stages():
            inner = getattr(stage, "blocks", stage)  # ConvNeXt stages hold .blocks
            out.extend(inner.children() if isinstance(inner, nn.Sequential) else [inner])
        return out

    def final_modules(self) -> dict[str, nn.Module]:
        m = self.model
        names = ["conv_head", "bn2", "norm_head", "norm_pre"]
        mods = {n: getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Module)}
        head = getattr(m, "head", None)
        if head is not None and isinstance(getattr(head, "norm", None), nn.Module):
            mods["head.norm"] = head.norm
        return {k: mod for k, mod in mods.items() if any(True for _ in mod.parameters())}

    def out_channels(self, modules: list[nn.Module]) -> list[int]:
        """Channels each of ``modules`` outputs, read off one small dummy forward pass."""
        dims: dict[int, int] = {}

        def record(module, inputs, output) -> None:
            dims[id(module)] = output.shape[1]

        hooks = [m.register_forward_hook(record) for m in modules]
        try:
            with torch.no_grad():
                p = next(self.model.parameters())
                self.model(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()
        return [dims[id(m)] for m in modules]
