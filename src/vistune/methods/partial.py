"""Partial-k: the last k blocks and the final norm(s) train, the rest stays frozen."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import VistuneError
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class PartialConfig(MethodConfig):
    k: int = option(1, "number of last blocks to tune (plus the final norm / CNN head conv)")

    def validate(self):
        if self.k < 1:
            raise VistuneError(f"partial: k={self.k} must be ≥ 1", "use --set k=1 or more")


def _tuned_modules(backbone, k: int):
    blocks = backbone.blocks()
    if k > len(blocks):
        raise VistuneError(
            f"partial: k={k} but backbone {backbone.spec.name!r} has only {len(blocks)} blocks",
            f"use --set k=1..{len(blocks)} (k={len(blocks)} is nearly full fine-tuning)",
        )
    return blocks[-k:] + list(backbone.final_modules().values())


@register("partial", category="fine-tuning",
          description="Partial-k: tune the last k blocks and the final norm (`partial-2` = k=2)")
class Partial(ModuleTuner):
    Config = PartialConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.02}  # base lr (× batch/256)
    # CNNs (the generic view): 0.02 reached 0.87 of the best on MobileNetV2 × clevr-count (3 seeds), 0.05 0.89 on
    # EfficientNet-Lite0 × mnist5k; 0.04, between them, is ≥ 0.93 on all eight CNN cells (docs/defaults.md)
    default_lrs_by_family = {"generic": {"adamw": 0.04}}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)
    mergeable = True

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        names = backbone.module_names(_tuned_modules(backbone, config.k))
        return {f"{m}.{p}" for m, mod in zip(names, _tuned_modules(backbone, config.k))
                for p, _ in mod.named_parameters()}

    def backbone_train_modules(self):
        return _tuned_modules(self.backbone, self.config.k)
