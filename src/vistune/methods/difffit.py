"""DiffFit (Xie et al., ICCV 2023): bias terms, norm layers and a learned scale γ per residual branch.

Each transformer block computes x + γ₁ ⊙ attn-branch(x) and then x + γ₂ ⊙ mlp-branch(x), γ ∈ R^d per channel,
initialised to 1 (step 0 is the frozen model); every bias (BitFit's rule: every parameter named ``*bias*``) and every
normalisation layer's affine weight and bias train too. The paper defines DiffFit on DiT, whose blocks are
pre-norm; on ViT-B the OSU-MLB/PETL_Vision benchmark code (``model/block.py``: γ after ``ls1``/``drop_path1``,
before the residual add; 'bias' and 'norm' parameters tuned) gives 102,912 + 19,200 + 18,432 = 140,544 parameters.

Placement: a pre-norm block's branches end in ``attn.proj`` and ``mlp.fc2`` (then only channel-wise dropout, layer
scale, drop path, or Swin's window reversal), so γ scales those modules' outputs; a post-norm block (Swin V2, timm's
``ResPostBlock``: ``x + norm1(attn(x))``) ends its branches in ``norm1``/``norm2``, so γ scales those. Which one a block
is, is read off one dummy pass (does ``norm1`` run before or after ``attn``?). γ therefore always folds into the
affine op that ends the branch (W, b → γ ⊙ W, γ ⊙ b): DiffFit merges into the stock model. Only the transformer views
offer such blocks (``attention-blocks``); on a CNN DiffFit would reduce to bias + norm tuning (a BatchNorm that ends a
residual branch absorbs γ), which ``bias`` and ``ln-tuning`` already are.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backbones.base import ATTENTION_BLOCKS, ForwardsAttributes, replace_module
from ..errors import VistuneError
from .base import Foldable, ModuleTuner, register
from .ln_tuning import NORMS


class BranchScale(ForwardsAttributes, nn.Module, Foldable):
    """γ ⊙ inner(x) over the last (channel) dimension; ``last`` names the affine op that ends ``inner``
    ("" when ``inner`` is that op itself, e.g. a post-norm)."""

    def __init__(self, inner: nn.Module, last: str, channels: int):
        super().__init__()
        self.inner, self.last = inner, last
        ref = next(inner.parameters())
        self.gamma = nn.Parameter(torch.ones(channels, device=ref.device, dtype=ref.dtype))

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.gamma


    def merged(self) -> nn.Module:
        """``inner`` with γ folded into its last affine op (same module types, same cost)."""
        op = self.inner.get_submodule(self.last) if self.last else self.inner
        scale = self.gamma.detach()
        with torch.no_grad():
            op.weight = nn.Parameter(op.weight * scale.view(-1, *[1] * (op.weight.ndim - 1)), requires_grad=False)
            if op.bias is not None:
                op.bias = nn.Parameter(op.bias * scale, requires_grad=False)
        return self.inner


def _post_norm(backbone, block: nn.Module) -> bool:
    """Does ``block`` run ``norm1`` after its attention (a post-norm block)? One dummy pass."""
    order: list[str] = []
    hooks = [block.norm1.register_forward_pre_hook(lambda *_: order.append("norm1")),
             block.attn.register_forward_pre_hook(lambda *_: order.append("attn"))]
    backbone.dummy_forward(hooks)
    return order.index("attn") < order.index("norm1")


@register("difffit", category="parameter", needs=(ATTENTION_BLOCKS,),
          description="DiffFit: biases, norms and a learned per-channel scale γ on each attention and MLP residual "
                      "branch; mergeable")
class DiffFit(ModuleTuner):
    mergeable = True
    # AdamW as the paper (which tunes DiT). Measured (docs/defaults.md): FacT's official ViT-B recipe (1e-3 at batch
    # 64, base 4e-3; the paper's lr is for DiT) reached 0.60 of the grid's best in a 4-epoch run; only the grid's
    # top, 0.1, reached ≥ 90 %
    default_optimizer = "adamw"
    default_lrs = {"adamw": 0.1}  # base lr (× batch/256)

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config):
        norms = {n for n, m in backbone.model.named_modules() if isinstance(m, NORMS)}
        return {n for n, _ in backbone.model.named_parameters() if "bias" in n or n.rpartition(".")[0] in norms}

    def attach(self):
        backbone = self.backbone
        blocks = backbone.blocks()
        for block in blocks:
            for part in ("norm1", "attn", "norm2", "mlp"):
                if not isinstance(getattr(block, part, None), nn.Module):
                    raise VistuneError(f"difffit: block {backbone.module_names([block])[0]} of {backbone.spec.name!r} "
                                       f"({type(block).__name__}) has no {part}", "use bias or ln-tuning")
        post = _post_norm(backbone, blocks[0])
        for block in blocks:
            name = backbone.module_names([block])[0]
            if post:
                branches = {"norm1": "", "norm2": ""}
            else:
                branches = {"attn": "proj", "mlp": "fc2"}
            for part, last in branches.items():
                inner = block.get_submodule(part)
                op = inner.get_submodule(last) if last else inner
                if getattr(op, "weight", None) is None:
                    raise VistuneError(f"difffit: {name}.{part} of {backbone.spec.name!r} does not end in an affine op "
                                       "γ could fold into", "use bias or ln-tuning")
                replace_module(backbone.model, f"{name}.{part}", BranchScale(inner, last, op.weight.shape[0]))
