"""The timm model classes remapping understands, and where their residual blocks sit in the state dict."""
from __future__ import annotations

import re
from dataclasses import dataclass

from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import VistuneError


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[type, ...]
    block_key: re.Pattern  # a block tensor's state-dict key → groups stage (absent: one stage), index, rest
    prefix: str  # the key prefix of block ``index`` of stage ``stage``
    depth_option: str | None  # the timm option that sets the depth (None: only through the architecture's name)

    def split(self, key: str) -> tuple[int, int, str] | None:
        """(stage, block index, rest of the key) for a block tensor, None for any other tensor."""
        m = self.block_key.match(key)
        if m is None:
            return None
        return int(m.groupdict().get("stage") or 0), int(m["index"]), m["rest"]

    def block_prefix(self, stage: int, index: int) -> str:
        return self.prefix.format(stage=stage, index=index)

    def stages(self, model: nn.Module) -> dict[int, list[nn.Module]]:
        """Stage number (as in the keys) → its residual blocks in forward order."""
        if self.name == "vit":
            return {0: list(model.blocks)}
        if self.name == "convnext":
            return {s: list(stage.blocks) for s, stage in enumerate(model.stages)}
        if self.name == "efficientnet":
            return {s: list(stage) for s, stage in enumerate(model.blocks)}
        return {s: list(getattr(model, f"layer{s}")) for s in range(1, 5)}


FAMILIES = (
    Family("vit", (VisionTransformer,), re.compile(r"^blocks\.(?P<index>\d+)\.(?P<rest>.+)$"),
           "blocks.{index}.", "depth"),
    Family("convnext", (ConvNeXt,), re.compile(r"^stages\.(?P<stage>\d+)\.blocks\.(?P<index>\d+)\.(?P<rest>.+)$"),
           "stages.{stage}.blocks.{index}.", "depths"),
    Family("efficientnet", (EfficientNet, MobileNetV3),
           re.compile(r"^blocks\.(?P<stage>\d+)\.(?P<index>\d+)\.(?P<rest>.+)$"), "blocks.{stage}.{index}.", None),
    Family("resnet", (ResNet,), re.compile(r"^layer(?P<stage>\d)\.(?P<index>\d+)\.(?P<rest>.+)$"),
           "layer{stage}.{index}.", "layers"),
)
SUPPORTED = "timm VisionTransformer (ViT, DeiT), ConvNeXt, EfficientNet/MobileNet and ResNet models"


def family_of(model: nn.Module, what: str) -> Family:
    """The family of ``model`` (``what`` names it in the refusal)."""
    for family in FAMILIES:
        if isinstance(model, family.classes):
            return family
    raise VistuneError(
        f"{what} is a {type(model).__name__}: remapping works on {SUPPORTED}, whose blocks it knows how to "
        "select from and grow",
        "pick a backbone of one of those families (Swin's window attention tables are not remapped)")


def same_family(source: nn.Module, target: nn.Module, target_name: str) -> Family:
    """The family of both models; they must be the same timm class (a DeiT is not remapped into a ViT)."""
    family = family_of(source, "the source backbone")
    if type(target) is not type(source):
        raise VistuneError(
            f"the target {target_name} is a {type(target).__name__}, the source a {type(source).__name__}: "
            "remapping maps weights between models of the same timm class",
            f"name a target architecture of the source's class ({type(source).__name__})")
    return family
