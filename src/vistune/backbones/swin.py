"""Views over timm's SwinTransformer and SwinTransformerV2 (hierarchical window attention, NHWC stages).

Window attention has no slot for extra tokens (the token grid is partitioned into windows and merged between
stages), so the seam these views offer token tuners is ``"window-prompts"``: :meth:`SwinView.prompted_attention`
wraps a block's stock attention so that every window also attends to a set of prompt keys/values. The wrappers
run the stock attention's own modules (``qkv``, ``proj``, the stock relative-position bias); the bias is kept for
patch→patch pairs and is zero for patch→prompt pairs (prompts have no position), and the prompts' own outputs
are never computed.

- Swin V1 (pre-norm blocks): the prompts pass through the block's ``norm1`` then ``qkv``, as a token of the
  residual stream would; scaled dot-product attention.
- Swin V2 (res-post-norm blocks: the attention reads the raw stream and ``norm1`` follows it): the prompts go
  straight to ``qkv`` (with its q/v biases); scaled *cosine* attention with the learned ``logit_scale``; the
  patch→patch bias is V2's continuous one, 16·sigmoid(``cpb_mlp``(log-spaced coordinates)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ATTENTION_BLOCKS, BackboneView, Borrowed


class PromptedWindowAttention(nn.Module):
    """A stock timm (V1) WindowAttention whose windows also attend to a set of prompt keys/values."""

    def __init__(self, inner: nn.Module, norm: nn.Module | None, prompts: nn.Parameter, dropout: float,
                 project: nn.Module | None):
        super().__init__()
        self.inner = inner
        self.dropout = nn.Dropout(dropout)
        # the block's frozen norm1 is the backbone's, and prompts/project are the method's: none of them is a
        # child here, so neither the artifact nor a shared backbone ever gets a second copy of them
        self.norm, self.prompts, self.project = Borrowed(norm), Borrowed(prompts), Borrowed(project)

    def prompt_tokens(self, windows: int) -> torch.Tensor:
        """(1 or ``windows``, P, C): the prompts as tokens of the residual stream, ready for ``qkv``; in training
        prompt dropout draws one mask per window, as VPT draws one per sample."""
        prompts = self.prompts.value if self.project.value is None else self.project.value(self.prompts.value)
        prompts = prompts.unsqueeze(0)
        if self.dropout.training and self.dropout.p > 0:
            prompts = self.dropout(prompts.expand(windows, -1, -1))
        return prompts if self.norm.value is None else self.norm.value(prompts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.inner
        b_, n, c = x.shape
        heads = a.num_heads
        q, k, v = a.qkv(x).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        prompts = self.prompt_tokens(b_)  # as a token in the residual stream: norm1 → qkv
        w, p = prompts.shape[:2]
        _, pk, pv = a.qkv(prompts).reshape(w, p, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([pk.expand(b_, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(b_, -1, -1, -1), v], dim=2)
        bias = a._get_rel_pos_bias()  # (1, heads, n, n): patch→patch only
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, n, n)).expand(b_ // nw, -1, -1, -1, -1)
            bias = bias.reshape(b_, heads, n, n)
        bias = F.pad(bias, (p, 0))  # patch→prompt pairs: no positional bias, never masked
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=a.attn_drop.p if self.training else 0.0)
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(b_, n, -1)))


def _v2_qkv(a: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's V2 WindowAttention q/k/v projection (q and v biases, k none)."""
    if a.q_bias is None:
        return a.qkv(x)
    qkv_bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
    return a.qkv(x) + qkv_bias if a.qkv_bias_separate else F.linear(x, a.qkv.weight, qkv_bias)


def v2_position_bias(a: nn.Module) -> torch.Tensor:
    """(heads, n, n): Swin V2's continuous relative-position bias of one window, as its attention computes it."""
    table = a.cpb_mlp(a.relative_coords_table).view(-1, a.num_heads)
    area = a.window_size[0] * a.window_size[1]
    bias = table[a.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    return 16 * torch.sigmoid(bias)


class PromptedWindowAttentionV2(PromptedWindowAttention):
    """A stock timm SwinTransformerV2 WindowAttention whose windows also attend to prompt keys/values."""

    def __init__(self, inner: nn.Module, prompts: nn.Parameter, dropout: float, project: nn.Module | None):
        super().__init__(inner, None, prompts, dropout, project)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.inner
        b_, n, c = x.shape
        heads = a.num_heads
        q, k, v = _v2_qkv(a, x).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        prompts = self.prompt_tokens(b_)
        w, p = prompts.shape[:2]
        _, pk, pv = _v2_qkv(a, prompts).reshape(w, p, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([pk.expand(b_, -1, -1, -1), k], dim=2)
        v = torch.cat([pv.expand(b_, -1, -1, -1), v], dim=2)
        logit_scale = torch.clamp(a.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * logit_scale
        bias = v2_position_bias(a).unsqueeze(0)  # (1, heads, n, n)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, nw, 1, n, n)).expand(b_ // nw, -1, -1, -1, -1)
            bias = bias.reshape(b_, heads, n, n)
        attn = a.attn_drop((attn + F.pad(bias, (p, 0))).softmax(dim=-1))
        return a.proj_drop(a.proj((attn @ v).transpose(1, 2).reshape(b_, n, -1)))


class SwinView(BackboneView):
    family = "swin"
    seams = frozenset({"window-prompts", "attn-mlp", ATTENTION_BLOCKS})
    transformer = True

    def stages(self) -> list[nn.Module]:
        return list(self.model.layers)

    def stage_names(self) -> list[str]:
        return self.module_names(self.stages())

    def stage_dims(self) -> list[int]:
        return [stage.dim for stage in self.model.layers]

    def blocks(self) -> list[nn.Module]:
        return [blk for stage in self.model.layers for blk in stage.blocks]

    def final_modules(self) -> dict[str, nn.Module]:
        return {"norm": self.model.norm}

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def prompted_attention(self, block: nn.Module, prompts: nn.Parameter, dropout: float,
                           project: nn.Module | None) -> nn.Module:
        """``block.attn`` wrapped so that its windows also attend to ``prompts`` (P, C) as keys/values."""
        return PromptedWindowAttention(block.attn, block.norm1, prompts, dropout, project)


class SwinV2View(SwinView):
    family = "swinv2"

    def prompted_attention(self, block: nn.Module, prompts: nn.Parameter, dropout: float,
                           project: nn.Module | None) -> nn.Module:
        return PromptedWindowAttentionV2(block.attn, prompts, dropout, project)
