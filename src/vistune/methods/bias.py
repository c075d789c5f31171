"""Bias tuning (BitFit): every backbone parameter whose name contains "bias", incl. norm biases."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, register


@dataclass
class BiasConfig(MethodConfig):
    pass


@register("bias", category="parameter",
          description="Bias tuning (BitFit): all bias terms of the backbone, incl. norm biases")
class Bias(Method):
    Config = BiasConfig
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def __init__(self, backbone, config, num_classes):
        super().__init__(backbone, config, num_classes)
        self.head = self.make_linear_head()

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        return {n for n, _ in backbone.model.named_parameters() if "bias" in n}
