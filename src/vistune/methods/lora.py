"""LoRA (Hu et al., ICLR 2022) through HF peft: W x + (alpha/r)·B A x on the targeted weights.

peft's own ``LoraConfig`` and layers do the work (Linear and Conv2d); vistune picks the targets
(default: W_q and W_v, the paper's choice, on the fused timm qkv — see peft_common; the MLP where an
attention reads its qkv weight directly; every dense conv and Linear on the generic view), trains with its
own trainer and head, and saves its own artifact. B starts at zero, so step 0 is the frozen model.
``alpha`` defaults to r (scaling 1), so the learning rate does not move with the rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import VistuneError
from .base import check_at_most, option, register
from .peft_common import PeftMethod, PeftMethodConfig, exact_names, require_peft


@dataclass
class LoRAConfig(PeftMethodConfig):
    r: int = option(8, "rank of each update B·A (paper grid 1, 2, 4, 8, 64)")
    alpha: float | None = option(None, "scaling numerator: update × alpha/r (alpha/√r with rslora); none = r")
    dropout: float = option(0.0, "dropout on the LoRA branch input")
    init: Literal["default", "gaussian"] = option(
        "default", "A: default = Kaiming-uniform (peft), gaussian = N(0, 1/r); B is always zero")
    rslora: bool = option(False, "rank-stabilised scaling alpha/√r (Kalajdzievski, 2023)")

    def validate(self):
        name = self.method or "lora"  # dora shares this config
        if self.r < 1:
            raise VistuneError(f"{name}: r={self.r} must be ≥ 1", "use e.g. --set r=8")
        check_at_most(name, "r", self.r, 1024, "16× the paper's largest, 64; a rank above a layer's width adds "
                      "nothing", 8)
        if self.alpha is not None and self.alpha <= 0:
            raise VistuneError(f"{name}: alpha={self.alpha} must be > 0 (or none for alpha = r)")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"{name}: dropout={self.dropout} must be in [0, 1)")


@register("lora", category="parameter",
          description="LoRA (peft): low-rank updates of W_q, W_v (transformers) or dense convs + Linears; mergeable")
class LoRA(PeftMethod):
    Config = LoRAConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # CNNs (the generic view): 0.05 reached 0.90 (LoRA) and 0.89 (DoRA) of the best on MobileNetV2; 0.02
    # passes every CNN cell measured for LoRA (DoRA: 0.01, its own)
    default_lrs_by_family = {"generic": {"adamw": 0.02}}
    use_dora = False

    def peft_config(self, targets):
        c = self.config
        return require_peft().LoraConfig(
            r=c.r, lora_alpha=c.alpha if c.alpha is not None else c.r, lora_dropout=c.dropout,
            target_modules=exact_names(targets), use_rslora=c.rslora, use_dora=self.use_dora,
            init_lora_weights=True if c.init == "default" else "gaussian", bias="none",
        )
