"""LN-tuning (Qi et al., 2022) through HF peft: every normalisation layer's affine weight and bias train.

peft's LNTuning keeps a trainable copy of each targeted norm next to the frozen one. On ViT/Swin
these are all LayerNorms (the paper's method); on CNNs we apply the same idea to the BatchNorm /
LayerNorm / GroupNorm layers (BN statistics stay frozen: the backbone runs in eval mode). Starts as
the frozen model; merging swaps the tuned copies in.
"""
from __future__ import annotations

from torch import nn

from ..errors import VistuneError
from .base import MethodConfig, register
from .peft_common import PeftMethod, exact_names, require_peft

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


@register("ln-tuning", category="parameter",
          description="LN-tuning (peft): affine weight and bias of every LayerNorm (CNN: every norm); mergeable")
class LNTuning(PeftMethod):
    Config = MethodConfig  # no options: every norm layer is tuned
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.1}  # base lr (× batch/256); 0.05 reached 0.88 of the best on the ViT

    def select_targets(self, backbone, config):
        found = {name: "norm" for name, m in backbone.model.named_modules()
                 if isinstance(m, NORMS) and getattr(m, "weight", None) is not None}
        if not found:
            raise VistuneError(f"backbone {backbone.spec.name!r} has no normalisation layer with affine weights",
                               "use another method (e.g. bias or lora)")
        return found

    def peft_config(self, targets):
        return require_peft().LNTuningConfig(target_modules=exact_names(targets))
