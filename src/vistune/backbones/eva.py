"""View over timm's ``Eva`` (EVA, EVA-02, and the ``vit_*_rope_*`` ViTs built on it): a ViT whose attention
rotates queries and keys by a rotary position embedding (RoPE) of the patch grid.

The token seam is the ViT's (prompts after the positional embedding and all prefix tokens, before ``norm_pre``);
timm's Eva attention applies RoPE to every token after the prefix tokens, so the view hands it a RoPE table with
an *identity rotation* (sin = 0, cos = 1) for each prompt: prompts get no rotary position, exactly as they get no
absolute one. Everything else is timm's own code: ``_pos_embed`` (which returns the RoPE table), ``norm_pre``, the
blocks called with ``rope=``, ``norm`` and ``forward_head``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .vit import ViTView


def rope_without_prompts(rope: torch.Tensor | None, num_prompts: int) -> torch.Tensor | None:
    """A RoPE table (…, N, 2·d: sin then cos) with ``num_prompts`` identity rows (sin 0, cos 1) in front."""
    if rope is None or num_prompts == 0:
        return rope
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(*rope.shape[:-2], num_prompts, half),
                          rope.new_ones(*rope.shape[:-2], num_prompts, rope.shape[-1] - half)], dim=-1)
    return torch.cat([identity, rope], dim=-2)


class EvaView(ViTView):
    family = "eva"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels → the stock input of block 1 (without its RoPE table)."""
        m = self.model
        return m.norm_pre(m._pos_embed(m.patch_embed(x))[0])

    def forward_tokens(self, x: torch.Tensor, prompts: torch.Tensor,
                       layer_prompts: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """The token seam (see :meth:`ViTView.forward_tokens`), with identity rotations for the prompts."""
        m = self.model
        tokens, rope = m._pos_embed(m.patch_embed(x))
        n, p = self.num_prefix_tokens, prompts.shape[1]
        seq = m.norm_pre(torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1))
        rope = rope_without_prompts(rope, p)
        per_block = getattr(m, "rope_mixed", False) and rope is not None  # one table per block (depth first)
        for i, block in enumerate(m.blocks):
            if layer_prompts is not None and i > 0:
                seq = torch.cat([seq[:, :n], layer_prompts(i), seq[:, n + p:]], dim=1)
            seq = block(seq, rope=rope[i] if per_block else rope)
        return self.head_features(torch.cat([seq[:, :n], seq[:, n + p:]], dim=1))

