"""Full fine-tuning: every backbone parameter trains (VPT's "Full" baseline; AdamW by default)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, register


@dataclass
class FullConfig(MethodConfig):
    pass


@register("full", category="fine-tuning", description="Full fine-tuning: all backbone parameters and a linear head")
class Full(Method):
    Config = FullConfig
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)
    default_optimizer = "adamw"

    def __init__(self, backbone, config, num_classes):
        super().__init__(backbone, config, num_classes)
        self.head = self.make_linear_head()

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        return {n for n, _ in backbone.model.named_parameters()}

    def backbone_train_modules(self):
        return [self.backbone.model]
