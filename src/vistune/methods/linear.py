"""Linear probe: only a linear head on the frozen pooled feature trains."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, register


@dataclass
class LinearConfig(MethodConfig):
    pass


@register("linear", category="fine-tuning", description="Linear probe: a linear head on the frozen pooled feature")
class Linear(Method):
    Config = LinearConfig
    supports_segmentation = True  # segmentation = frozen backbone + FPN decoder only (the baseline)
    trains_head_only = True  # the frozen feature can be computed once (feature cache)

    def __init__(self, backbone, config, num_classes):
        super().__init__(backbone, config, num_classes)
        self.head = self.make_linear_head()
