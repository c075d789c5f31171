"""(IA)³ (Liu et al., NeurIPS 2022, "T-Few") through HF peft: learned vectors that rescale activations.

The paper rescales keys, values and the FFN's hidden activation; on a transformer view that is ``kv+fc2``
(default): k and v rows of the fused qkv (split, see peft_common) are scaled at their output, fc2 at
its input (peft's "feedforward" modules); ``fc2`` alone where the attention reads its qkv weight directly
(EVA-02, BEiT, Swin V2). On every other timm model every dense conv's and Linear's outputs are scaled.
The vectors start at one, so step 0 is the frozen model; merging multiplies them into the weights.
"""
from __future__ import annotations

from .base import register
from .peft_common import PeftMethod, exact_names, require_peft


@register("ia3", category="parameter",
          description="(IA)3 (peft): rescales k, v and the FFN hidden activation (CNN: conv outputs); mergeable")
class IA3(PeftMethod):
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # the own ViT: 0.05 reached 0.85 of the best (0.2) on digits, 0.1 reached 0.88 on clevr-count (3 seeds);
    # 0.2 is ≥ 0.95 on all four tasks (docs/defaults.md)
    default_lrs_by_family = {"vit": {"adamw": 0.2}}
    default_targets = {"transformer": "kv+fc2", "generic": "dense"}
    fallback_targets = "fc2"

    def peft_config(self, targets):
        return require_peft().IA3Config(
            target_modules=exact_names(targets),
            feedforward_modules=exact_names(n for n, role in targets.items() if role == "fc2"),
        )
