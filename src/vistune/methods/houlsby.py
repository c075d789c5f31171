"""Houlsby adapter (Houlsby et al., ICML 2019): a bottleneck with a skip after BOTH sub-layers of every block.

Per block, on the output y of the attention and of the MLP, before the residual add:
    y ← y + s · up(act(down(y)))
(google-research/adapter-bert ``modeling.py``: ``adapter_fn`` on the attention output and on the FFN output,
GELU, weights truncated-normal with std ``init_scale`` = 1e-3 in the code (the paper says 1e-2), zero biases;
the layer norms train too). On ViTs: ViT, DeiT, EVA, BEiT (after ``attn``, inside the block's LayerScale if it
has one) and Swin V1/V2 (Swin's attention runs per window, and the adapter acts on each token alone, so
wrapping the window attention's output is the same as adapting the merged map). The vision readings agree on the
placement: OSU-MLB/PETL_Vision (``rand_h_adapter``: ``ft_attn_mode``/``ft_mlp_mode: sequential_after``) and
visinf/adapter_plus (``forward_houlsby``). Defaults follow the original where they differ: GELU (PETL_Vision:
ReLU, ``--set act=relu``), Houlsby's init (PETL_Vision: Xavier), every LayerNorm trained (Adapter+'s Houlsby
ablation trains them too; PETL_Vision does not: ``--set train_norms=false``). Bottleneck 8 as both vision
readings (the BERT code's default is 64: ``--set bottleneck=64``). Backbones without transformer blocks (the
``attn-mlp`` seam) are refused: the bottleneck adapter after each CNN block is the ``adapter`` method.

Tuned parameters per block: 2 · (2·D·h + h + D), plus every LayerNorm's weight and bias with ``train_norms``:
ViT-B/16, h = 8: 12 · 26,128 + 25 · 1,536 = 313,536 + 38,400 = 351,936.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import VistuneError
from .adapter_common import After, Bottleneck, branches, dataflow
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class HoulsbyConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width h of each adapter (vision readings 8; the BERT code's default 64)")
    act: Literal["gelu", "relu"] = option("gelu", "non-linearity: gelu (Houlsby's code) or relu (PETL_Vision)")
    init: Literal["houlsby", "lora", "xavier"] = option(
        "houlsby", "houlsby: down and up truncated-normal(init_std), near the identity; lora / xavier: down "
                   "Kaiming / Xavier-uniform, up zeros (exactly the identity at step 0)")
    init_std: float = option(1e-3, "std of the houlsby init (Houlsby's code 1e-3; the paper says 1e-2)")
    scale: float = option(1.0, "s: each adapter's bottleneck output is multiplied by s before its skip")
    dropout: float = option(0.0, "dropout on the hidden units while training (PETL_Vision: 0.1)")
    train_norms: bool = option(True, "also train every LayerNorm's weight and bias, as Houlsby et al.")

    def validate(self):
        if self.bottleneck < 1:
            raise VistuneError(f"houlsby: bottleneck={self.bottleneck} must be ≥ 1", "e.g. --set bottleneck=8")
        if self.init_std <= 0:
            raise VistuneError(f"houlsby: init_std={self.init_std} must be > 0", "e.g. --set init_std=0.001")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"houlsby: dropout={self.dropout} must be in [0, 1)", "e.g. --set dropout=0.1")


def layer_norm_parameters(model: nn.Module) -> set[str]:
    """Names of every LayerNorm's parameters (timm's LayerNorm subclasses torch's)."""
    return {f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
            for p, _ in m.named_parameters(recurse=False)}


@register("houlsby", category="adapter", needs=("attn-mlp",),
          description="Houlsby adapter: a GELU bottleneck with a skip after the attention and after the MLP of "
                      "every block (h=8), LayerNorms trained")
class Houlsby(ModuleTuner):
    Config = HoulsbyConfig
    default_lrs = {"sgd": 0.5}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    @classmethod
    def tuned_backbone_parameters(cls, backbone, config) -> set[str]:
        return layer_norm_parameters(backbone.model) if config.train_norms else set()

    def attach(self):
        config, blocks = self.config, self.backbone.blocks()
        calls = dataflow(self.backbone, [m for b in blocks for m in (b.attn, b.mlp)])
        for i, block in enumerate(blocks):
            for slot, call in (("attn", calls[2 * i]), ("mlp", calls[2 * i + 1])):
                if not torch.is_tensor(call.output):
                    raise VistuneError(
                        f"houlsby: {slot} of block {i} of {self.backbone.spec.name!r} does not return one tensor "
                        "in the model's forward, so there is no sub-layer output to adapt",
                        "use a backbone built from timm's ViT/EVA/BEiT/Swin blocks, or another method")
                branch = Bottleneck(call.output.shape[-1], config.bottleneck, act=config.act, init=config.init,
                                    std=config.init_std, dropout=config.dropout, scale=config.scale)
                setattr(block, slot, After(getattr(block, slot), branch))

    def backbone_train_modules(self) -> list[nn.Module]:
        return branches(self.backbone.model)
