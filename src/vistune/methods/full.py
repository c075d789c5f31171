"""Full fine-tuning: every backbone parameter trains (VPT's "Full" baseline; AdamW by default)."""
from __future__ import annotations

from .base import ModuleTuner, register


@register("full", category="fine-tuning", description="Full fine-tuning: all backbone parameters and a linear head")
class Full(ModuleTuner):
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.01}  # base lr (× batch/256): the best on the own ViT × fashion-mnist
    # CNNs (the generic view): 0.01 reached 0.87 of the best on MobileNetV2 × digits, 0.02 0.89 on its clevr-count
    # (3 seeds); 0.015, between the two grid points, is ≥ 0.91 on all eight CNN cells (docs/defaults.md)
    default_lrs_by_family = {"generic": {"adamw": 0.015}}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)
    mergeable = True

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        return {n for n, _ in backbone.model.named_parameters()}

    def backbone_train_modules(self):
        return [self.backbone.model]
