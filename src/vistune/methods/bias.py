"""Bias tuning (BitFit): every backbone parameter whose name contains "bias", incl. norm biases."""
from __future__ import annotations

from .base import ModuleTuner, register


@register("bias", category="parameter",
          description="Bias tuning (BitFit): all bias terms of the backbone, incl. norm biases")
class Bias(ModuleTuner):
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # CNNs (the generic view): 0.05 reached 0.85 of the best on MobileNetV2 (0.1: chance); 0.02 passes both
    # CNNs (docs/defaults.md)
    # the own ViT: 0.05 reached 0.88 of the best (0.2) on mnist5k, 0.1 ≥ 0.96 there, on fashion-mnist and on digits
    default_lrs_by_family = {"generic": {"adamw": 0.02}, "vit": {"adamw": 0.1}}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)
    mergeable = True

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        return {n for n, _ in backbone.model.named_parameters() if "bias" in n}
