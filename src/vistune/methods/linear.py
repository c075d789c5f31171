"""Linear probe: only a linear head on the frozen pooled feature trains."""
from __future__ import annotations

from .base import Method, register


@register("linear", category="fine-tuning", description="Linear probe: a linear head on the frozen pooled feature")
class Linear(Method):
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # the own ViT (192 LayerNorm'd features, not a CNN's 1280 pooled ones): 0.05 reached 0.80 of the best (0.2) on
    # mnist5k, 0.2 the best there and on fashion-mnist, 0.95 on digits, run afterwards (docs/defaults.md)
    default_lrs_by_family = {"vit": {"adamw": 0.2}}
    head_only = True  # the frozen feature can be computed once (feature cache)
    supports_segmentation = True  # segmentation = frozen backbone + FPN decoder only (the baseline)
    mergeable = True  # the head becomes timm's classifier
