"""Visual Prompt Tuning (Jia et al., ECCV 2022): VPT-shallow and VPT-deep.

Token families — ViT, EVA, BEiT (a token tuner): learnable prompt tokens are inserted after the positional embedding, after ALL
prefix tokens (CLS, registers, DeiT's distillation token): [prefix, P, patches], through the view's one seam
(``ViTView.forward_tokens``; before ``norm_pre``, which only CLIP-style towers have). Shallow: before block 1
only, the prompts then travel through every block. Deep: every block gets its own prompts; before block i ≥ 2
the previous block's prompt outputs are discarded and replaced. The stock timm blocks run on the modified
sequence, so attention stays timm's own (fused SDPA). Prompt outputs are dropped before the final norm and
pooling, so avg-pool models never pool over prompts. Prompt dropout draws its mask per sample (as the official
code, which drops after expanding the prompts to the batch). On EVA the prompts get no rotary position (identity
rotation), on BEiT no relative-position bias (zero bias rows/columns): see the views in ``backbones/``.

Swin V1 and V2 (a module tuner; our design — the official Swin code is buggy, vpt#6): window attention has no slot for extra
tokens — the token grid is partitioned into windows and merged between stages — so each prompt
set is an extra set of keys/values that every window of a block attends to (the view's
``prompted_attention``, backbones/swin.py). V1: the prompts go through the block's own norm1 and
qkv projection; V2 (post-norm blocks, cosine attention): straight through qkv. The block's
relative-position bias is kept for patch→patch pairs and is zero for patch→prompt pairs, and the
prompts' own outputs are never computed (VPT-deep discards them anyway). Deep: every block of every stage has its own prompts
(stage width); shallow: only the first block of the first stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import VistuneError
from ..backbones.swin import PromptedWindowAttention, PromptedWindowAttentionV2  # noqa: F401 (the Swin seam's wrappers)
from .base import MethodConfig, ModuleTuner, TokenTuner, check_at_most, option, register


@dataclass
class VPTConfig(MethodConfig):
    num_tokens: int = option(10, "prompt length p per layer (paper grid 1, 5, 10, 50, 100, 200)")
    dropout: float | None = option(None, "prompt dropout (default: 0.1 for deep, 0.0 for shallow)")
    project_dim: int | None = option(
        None, "if set, prompts live in this smaller dim and one shared Linear(project_dim, D) maps them up"
    )
    init: Literal["uniform", "normal"] = option(
        "uniform", "uniform: U(±sqrt(6/(3·ph·pw + d))) as VPT (0.0625 on ViT-B/16); normal: N(0, 0.02)"
    )
    head_init: Literal["default", "vpt"] = option(
        "default", "vpt: head weight kaiming-normal (fan_out), bias -log(99) ≈ -4.595, as the official code"
    )

    def validate(self):
        if self.num_tokens < 1:
            raise VistuneError(f"vpt: num_tokens={self.num_tokens} must be ≥ 1", "use --set num_tokens=10")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise VistuneError(f"vpt: dropout={self.dropout} must be in [0, 1)")
        if self.project_dim is not None and self.project_dim < 1:
            raise VistuneError(f"vpt: project_dim={self.project_dim} must be ≥ 1 (or none)")
        check_at_most("vpt", "num_tokens", self.num_tokens, 1000,
                      "5× the paper's largest, 200; every prompt joins the attention of every block", 10)
        if self.project_dim is not None:
            check_at_most("vpt", "project_dim", self.project_dim, 4096, "wider than any ViT's embedding", 64)


def _init_prompts(p: torch.Tensor, config: VPTConfig, patch_area: int) -> None:
    if config.init == "normal":
        nn.init.normal_(p, std=0.02)
    else:
        bound = math.sqrt(6.0 / float(3 * patch_area + p.shape[-1]))
        nn.init.uniform_(p, -bound, bound)


@register("vpt-shallow", category="prompt", needs=("tokens", "window-prompts"),
          description="VPT-shallow: p prompt tokens before block 1 (ViT); prompt keys/values in block 1 (Swin)")
class VPTShallow(TokenTuner, ModuleTuner):
    """A token tuner on the token families (ViT, EVA, BEiT); on Swin V1/V2 a module tuner (prompted window
    attention)."""

    default_optimizer = "sgd"  # VPT's recipe; docs/defaults.md: measured against the lr grid
    default_lrs = {"sgd": 1.0}  # base lr (× batch/256)

    Config = VPTConfig
    deep = False

    def attach(self):
        backbone, config = self.backbone, self.config
        self.drop_rate = config.dropout if config.dropout is not None else (0.1 if self.deep else 0.0)
        p = config.num_tokens
        self.tokens = "tokens" in backbone.seams  # else: prompt keys/values in window attention
        if self.tokens:
            dims = [backbone.embed_dim] * (len(backbone.blocks()) if self.deep else 1)
        else:
            blocks = backbone.blocks() if self.deep else backbone.blocks()[:1]
            dims = [blk.attn.qkv.in_features for blk in blocks]
        patch_area = math.prod(backbone.patch_size)
        # prompt projection: one Linear per distinct width (ViT: one; Swin: one per stage width)
        self.project = None
        if config.project_dim is not None:
            self.project = nn.ModuleDict({str(d): nn.Linear(config.project_dim, d) for d in sorted(set(dims))})
            for lin in self.project.values():
                nn.init.kaiming_normal_(lin.weight, a=0, mode="fan_out")
                nn.init.zeros_(lin.bias)
        prompt_dim = lambda d: config.project_dim or d  # noqa: E731
        self.prompts = nn.ParameterList([nn.Parameter(torch.empty(p, prompt_dim(d))) for d in dims])
        for prompt in self.prompts:
            _init_prompts(prompt, config, patch_area)
        self.prompt_dropout = nn.Dropout(self.drop_rate)
        if not self.tokens:
            for blk, prompt, d in zip(blocks, self.prompts, dims):
                proj = self.project[str(d)] if self.project is not None else None
                blk.attn = backbone.prompted_attention(blk, prompt, self.drop_rate, proj)

    def build_head(self) -> nn.Module:
        head = self.make_linear_head()
        if self.config.head_init == "vpt":
            nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
        return head

    def backbone_train_modules(self):
        # Swin: the prompt dropout sits inside the frozen backbone, which otherwise runs in eval mode
        return [m.dropout for m in self.backbone.model.modules() if isinstance(m, PromptedWindowAttention)]

    def prompt_tokens(self, i: int, batch: int) -> torch.Tensor:
        """Block i's prompts for a batch, (B, p, D); dropout draws its mask per sample."""
        p = self.prompts[i]
        if self.project is not None:
            p = self.project[str(self.backbone.embed_dim)](p)
        return self.prompt_dropout(p.unsqueeze(0).expand(batch, -1, -1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return self.backbone.forward_features(x)
        batch = x.shape[0]
        deep = (lambda i: self.prompt_tokens(i, batch)) if self.deep else None
        return self.backbone.forward_tokens(x, self.prompt_tokens(0, batch), deep)


@register("vpt-deep", category="prompt", needs=("tokens", "window-prompts"),
          description="VPT-deep: own p prompt tokens at every block, previous prompt outputs discarded")
class VPTDeep(VPTShallow):
    deep = True
    # base lr (× batch/256), another point of VPT's grid: 1.0 (VPT-shallow's) reached 0.53 of the best on the own
    # ViT × digits (the loss rose 2.4 → 3.9), 0.5 ≥ 0.96 there and on fashion-mnist (docs/defaults.md)
    default_lrs = {"sgd": 0.5}
