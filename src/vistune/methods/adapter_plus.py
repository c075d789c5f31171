"""Adapter+ (Steitz & Roth, CVPR 2024, "Adapters Strike Back"): a post-block adapter with channel-wise scaling.

Per block, on its output y (after the MLP residual — the paper's "Post-Adapter" position):
    y ← y + γ ⊙ drop_path(up(GELU(down(y))))
with γ ∈ R^D a learned channel-wise scaling (init 1), no adapter LayerNorm, down and up initialised
truncated-normal (std 0.01, cut at ±2 std, "Houlsby init") with zero biases, and drop-path 0.1 on the adapter
branch while training — the configuration ``conf/adapter/adapter_plus.yaml`` of visinf/adapter_plus
(``config: post``, ``scaling: channel``, ``norm_layer: false``, ``init: houlsby``, ``dim: 8``,
``drop_path: 0.1``; ``AdapterBlock.forward_post``). The paper's VTAB runs also put drop-path 0.1 on the frozen
ViT; vistune keeps the frozen backbone in eval mode, as for every method.

Every backbone: the adapter follows each block of the view's ``blocks()`` — ViT/EVA/BEiT token sequences,
Swin's NHWC maps, and (vistune's reading on CNNs, which the paper does not cover) the residual blocks of any
other timm model, on their NCHW or channels-last feature maps, with Linears on the channel dimension (= 1×1
convolutions). Blocks that do not return one feature map or token tensor are refused.

Tuned parameters per block: 2·D·h + h + D + D: ViT-B/16, h = 8: 12 · 13,832 = 165,984.
Recipe of the official code: AdamW lr 1e-3 at batch 64 (vistune: base lr 4e-3 × batch/256), weight decay 1e-4,
100 epochs, 10 warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones.base import replace_module
from ..errors import VistuneError
from .adapter_common import After, Bottleneck, branches
from .base import MethodConfig, ModuleTuner, option, register


@dataclass
class AdapterPlusConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width h of each adapter (the paper's VTAB runs: 1-32 per task; default 8)")
    drop_path: float = option(0.1, "drop-path rate on the adapter branch while training (official 0.1)")
    init_std: float = option(0.01, "std of the truncated-normal init of down and up (official 0.01)")

    def validate(self):
        if self.bottleneck < 1:
            raise VistuneError(f"adapter-plus: bottleneck={self.bottleneck} must be ≥ 1", "e.g. --set bottleneck=8")
        if not 0 <= self.drop_path < 1:
            raise VistuneError(f"adapter-plus: drop_path={self.drop_path} must be in [0, 1)",
                               "e.g. --set drop_path=0.1")
        if self.init_std <= 0:
            raise VistuneError(f"adapter-plus: init_std={self.init_std} must be > 0", "e.g. --set init_std=0.01")


@register("adapter-plus", category="adapter",
          description="Adapter+: a GELU bottleneck with channel-wise scaling after every block (post-adapter, h=8, "
                      "Houlsby init, drop-path 0.1)")
class AdapterPlus(ModuleTuner):
    Config = AdapterPlusConfig
    default_optimizer = "adamw"
    # measured (docs/defaults.md): the official AdamW 1e-3 at batch 64 (base 4e-3) reached 0.66 of the grid's best in
    # a 4-epoch run; 0.02 (the next default) 0.86 on EfficientNet-Lite0 × clevr-count over three seeds, 0.05 ≥ 0.97 in
    # every cell measured
    default_lrs = {"adamw": 0.05}
    # the own ViT: 0.05 reached 0.83 of the best (0.2) on mnist5k, 0.1 ≥ 0.97 on its three tasks measured
    default_lrs_by_family = {"vit": {"adamw": 0.1}}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)

    def attach(self):
        backbone, config = self.backbone, self.config
        blocks = backbone.blocks()
        names = backbone.module_names(blocks)
        layouts = backbone.layouts(blocks)
        if None in layouts:
            raise VistuneError(
                f"adapter-plus: block {names[layouts.index(None)]} of {backbone.spec.name!r} does not output one "
                "feature map or token tensor, so there is no place for an adapter after it",
                "use another method on this backbone (lora, ssf, bias, ...)")
        for name, block, layout in zip(names, blocks, layouts):
            branch = Bottleneck(layout.channels, config.bottleneck, act="gelu", init="houlsby", std=config.init_std,
                                channel_scale=True, drop_path=config.drop_path)
            replace_module(backbone.model, name, After(block, branch, layout.channel_dim))

    def backbone_train_modules(self) -> list[nn.Module]:
        return branches(self.backbone.model)
