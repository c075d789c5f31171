"""LN-tuning (Qi et al., 2022) through HF peft: every normalisation layer's affine weight and bias train.

peft's LNTuning keeps a trainable copy of each targeted norm next to the frozen one. On ViT/Swin
these are all LayerNorms (the paper's method); on every other timm model we apply the same idea to
every normalisation layer with an affine weight — BatchNorm (BN statistics stay frozen: the backbone
runs in eval mode), LayerNorm (incl. timm's channels-first LayerNorm2d), GroupNorm, RMSNorm. Starts as
the frozen model; merging swaps the tuned copies in.
"""
from __future__ import annotations

from timm.layers import RmsNorm, RmsNorm2d, SimpleNorm, SimpleNorm2d
from torch import nn

from ..errors import VistuneError
from .base import MethodConfig, register
from .peft_common import PeftMethod, exact_names, require_peft

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm, RmsNorm, RmsNorm2d,
         SimpleNorm, SimpleNorm2d)


@register("ln-tuning", category="parameter",
          description="LN-tuning (peft): affine weight and bias of every LayerNorm (other backbones: every norm); "
                      "mergeable")
class LNTuning(PeftMethod):
    Config = MethodConfig  # no options: every norm layer is tuned
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.1}  # base lr (× batch/256)
    # the own ViT: 0.1 reached 0.85 of the best (0.2) on clevr-count (3 seeds), 0.2 is the best on all four tasks
    # CNNs (the generic view: BatchNorm affines): 0.1 stayed near chance on MobileNetV2 (val 0.235; 0.02: 0.800);
    # 0.02 reached 0.66 of the best on its clevr-count, 0.01 passes every CNN cell measured (docs/defaults.md)
    default_lrs_by_family = {"generic": {"adamw": 0.01}, "vit": {"adamw": 0.2}}

    def select_targets(self, backbone, config):
        found = {name: "norm" for name, m in backbone.model.named_modules()
                 if isinstance(m, NORMS) and getattr(m, "weight", None) is not None}
        if not found:
            raise VistuneError(f"backbone {backbone.spec.name!r} has no normalisation layer with affine weights",
                               "use another method (e.g. bias or lora)")
        return found

    def peft_config(self, targets):
        return require_peft().LNTuningConfig(target_modules=exact_names(targets))
