"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck parallel to each block's MLP (the "AdaptMLP").

Per block, with x′ the residual stream after the attention residual:
    x = x′ + MLP(LN(x′)) + s · up(dropout(ReLU(down(x′))))
as the official code (ShoufaChen/AdaptFormer ``models/custom_modules.py``: ``ffn_option="parallel"``,
``ffn_adapter_layernorm_option="none"``, ``ffn_adapter_scalar="0.1"``, ``ffn_num=64``, dropout 0.1, LoRA init:
down Kaiming-uniform, up and both biases zero). The paper's Eq. feeds the branch LN(x′) instead; the code feeds
it x′, and so does vistune by default (``input=stream``; ``input=norm`` is the paper's equation).

Placement: the block's ``norm2`` moves into a :class:`~.adapter_common.Beside` wrapper at ``mlp`` (its slot
holds an identity), so the stock block computes x′ + f(MLP(LN(x′)) + branch(x′)) with f its LayerScale /
drop-path (identities on ViT-B). Pre-norm transformer blocks: ViT, DeiT, EVA, BEiT, Swin V1; a block whose MLP
does not read ``norm2``'s output (Swin V2, res-post-norm) is refused, as is every backbone without transformer
blocks (the ``attn-mlp`` seam). Step 0 is exactly the frozen model (up = 0).

Tuned parameters per block: 2·D·h + h + D (h = ``bottleneck``): ViT-B/16, h = 64: 12 · 99,136 = 1,189,632.
Recipe of the official image fine-tuning: SGD momentum 0.9, base lr 0.1 (× batch/256), no weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import VistuneError
from .adapter_common import Beside, Bottleneck, branches, pre_norm_mlps
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class AdaptFormerConfig(MethodConfig):
    bottleneck: int = option(64, "hidden width of the parallel bottleneck (official default 64)")
    scale: float = option(0.1, "s: the branch's output is multiplied by s (official 0.1)")
    dropout: float = option(0.1, "dropout on the bottleneck's hidden units while training (official 0.1)")
    input: Literal["stream", "norm"] = option(
        "stream", "what the branch reads: stream = the MLP's residual-stream input x' (official code); "
                  "norm = LN(x'), the MLP's own input (the paper's equation)")

    def validate(self):
        if self.bottleneck < 1:
            raise VistuneError(f"adaptformer: bottleneck={self.bottleneck} must be ≥ 1", "e.g. --set bottleneck=64")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"adaptformer: dropout={self.dropout} must be in [0, 1)", "e.g. --set dropout=0.1")


@register("adaptformer", category="adapter", needs=("attn-mlp",),
          description="AdaptFormer: a scaled ReLU bottleneck parallel to every MLP (s=0.1, h=64), reading the "
                      "residual stream")
class AdaptFormer(ModuleTuner):
    Config = AdaptFormerConfig
    # measured (docs/defaults.md): the official blr 0.1 reached 0.86 of the grid's best in a 4-epoch run; 0.5 is
    # the lowest grid lr that reached ≥ 90 %
    default_lrs = {"sgd": 0.5}  # base lr (× batch/256), SGD momentum 0.9 as the official code
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def attach(self):
        config = self.config
        for block, dim in pre_norm_mlps(self.backbone, "adaptformer"):
            branch = Bottleneck(dim, config.bottleneck, act="relu", init="lora", dropout=config.dropout,
                                scale=config.scale)
            if config.input == "stream":
                block.mlp = Beside(block.mlp, branch, norm=block.norm2)
                block.norm2 = nn.Identity()
            else:
                block.mlp = Beside(block.mlp, branch)

    def backbone_train_modules(self) -> list[nn.Module]:
        return branches(self.backbone.model)
