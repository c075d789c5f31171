"""Linear probe: only a linear head on the frozen pooled feature trains."""
from __future__ import annotations

from .base import Method, register


@register("linear", category="fine-tuning", description="Linear probe: a linear head on the frozen pooled feature")
class Linear(Method):
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    head_only = True  # the frozen feature can be computed once (feature cache)
    supports_segmentation = True  # segmentation = frozen backbone + FPN decoder only (the baseline)
    mergeable = True  # the head becomes timm's classifier
