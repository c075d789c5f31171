"""View over timm's ``Beit`` (BEiT, BEiT-v2): a ViT whose attention adds a learned relative-position bias
(per block, or one shared by all blocks) of the stock sequence length, CLS token included.

timm's BEiT attention adds that bias with the fixed shape of the stock sequence, so it cannot take extra tokens
as it is. The token seam therefore runs each block from the block's own stock modules (``norm1``, the
attention's ``qkv`` with its q/v biases, the stock ``_get_rel_pos_bias()`` and shared ``rel_pos_bias()``,
``proj``, ``gamma_1/2``, ``drop_path1/2``, ``norm2``, ``mlp``) in timm's order, with the bias padded by zeros for
the prompt rows and columns: prompts get no relative position, as they get no absolute one. Without prompts
this is timm's forward (``tests/test_backbones.py`` checks it against ``forward_features``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .vit import ViTView


def insert_zero_positions(bias: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """An attention bias (…, N, N) with ``count`` zero rows and columns inserted at ``start``."""
    if bias is None or count == 0:
        return bias
    rows = bias.new_zeros(*bias.shape[:-2], count, bias.shape[-1])
    bias = torch.cat([bias[..., :start, :], rows, bias[..., start:, :]], dim=-2)
    cols = bias.new_zeros(*bias.shape[:-1], count)
    return torch.cat([bias[..., :start], cols, bias[..., start:]], dim=-1)


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """timm's BEiT ``Attention.forward`` with the given (already padded) position bias."""
    b, n, c = x.shape
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + qkv_bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, qkv_bias)
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, -1)))


def prompted_block(block: nn.Module, x: torch.Tensor, start: int, count: int,
                   shared_bias: torch.Tensor | None) -> torch.Tensor:
    """timm's BEiT ``Block.forward`` on a sequence with ``count`` position-free tokens at ``start``."""
    attn = block.attn
    bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared_bias is not None:
        bias = shared_bias if bias is None else bias + shared_bias
    a = _attention(attn, block.norm1(x), insert_zero_positions(bias, start, count))
    if block.gamma_1 is None:
        x = x + block.drop_path1(a)
        return x + block.drop_path2(block.mlp(block.norm2(x)))
    x = x + block.drop_path1(block.gamma_1 * a)
    return x + block.drop_path2(block.gamma_2 * block.mlp(block.norm2(x)))


class BeitView(ViTView):
    family = "beit"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def forward_tokens(self, x: torch.Tensor, prompts: torch.Tensor,
                       layer_prompts: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """The token seam (see :meth:`ViTView.forward_tokens`); prompts get zero relative-position bias."""
        m = self.model
        tokens = self.embed(x)
        n, p = self.num_prefix_tokens, prompts.shape[1]
        seq = torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)
        shared = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        for i, block in enumerate(m.blocks):
            if layer_prompts is not None and i > 0:
                seq = torch.cat([seq[:, :n], layer_prompts(i), seq[:, n + p:]], dim=1)
            seq = prompted_block(block, seq, n, p, shared)
        return self.head_features(torch.cat([seq[:, :n], seq[:, n + p:]], dim=1))
