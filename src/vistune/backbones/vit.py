"""View over timm's VisionTransformer and kin (ViT, DeiT, DINOv2, CLIP, SigLIP, hybrid ViTs).

Handles CLS + register tokens, DeiT's distillation token, no-CLS avg-pool models and
CLIP-style ``norm_pre`` by using timm's own ``_pos_embed``/``norm_pre``/``forward_head``.
Hybrid ViTs (a CNN stem in ``HybridEmbed``) are ViTs here: their blocks run the same token
sequence; only their patch projection is not a patchify convolution of the pixels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import ATTENTION_BLOCKS, BackboneView


class ViTView(BackboneView):
    family = "vit"
    seams = frozenset({"tokens", "attn-mlp", ATTENTION_BLOCKS})
    transformer = True

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, register and distillation tokens that precede the patch tokens."""
        return self.model.num_prefix_tokens

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per token (a hybrid's CNN stride × its patch size on the feature map)."""
        pe = self.model.patch_embed
        if getattr(pe, "img_size", None) is not None and getattr(pe, "grid_size", None) is not None:
            return tuple(i // g for i, g in zip(pe.img_size, pe.grid_size))
        return tuple(pe.patch_size)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def final_modules(self) -> dict[str, nn.Module]:
        mods = {"norm": getattr(self.model, "norm", None), "fc_norm": getattr(self.model, "fc_norm", None)}
        return {k: m for k, m in mods.items() if isinstance(m, nn.Module) and any(True for _ in m.parameters())}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels → the stock input of block 1: [prefix tokens, patches] after the positional embedding and
        ``norm_pre`` (token tuners use :meth:`forward_tokens`)."""
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, h·ph, w·pw) → (B, h·w, D) through the stock patch projection, no positions.

        Unlike ``patch_embed`` itself this accepts any multiple of the patch size (e.g. a strip)."""
        pe = self.model.patch_embed
        return pe.norm(pe.proj(pixels).flatten(2).transpose(1, 2))

    def forward_tokens(self, x: torch.Tensor, prompts: torch.Tensor,
                       layer_prompts: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """THE seam of token tuners: the frozen forward with position-free prompt tokens.

        ``prompts`` (B, P, D) enter after the positional embedding, after all prefix tokens, *before*
        ``norm_pre``: they are tokens of the input sequence like the patch tokens (so on CLIP-style towers, whose
        ``norm_pre`` is a real LayerNorm, they go through it as MaPLe's CLIP prompts do; on every other ViT
        ``norm_pre`` is the identity). This is also the only placement under which PGN's prompts deployed as extra
        pixel patches (``forward_with_extra_patches``) compute the same function. ``layer_prompts(i)`` (VPT-deep),
        if given, replaces the previous block's prompt outputs before block i ≥ 1 with (B, P, D) new prompts in
        the residual stream. The prompts' outputs are dropped before the final norm and pooling. Returns the
        pooled feature (B, D)."""
        m = self.model
        tokens = m.patch_drop(m._pos_embed(m.patch_embed(x)))
        n, p = self.num_prefix_tokens, prompts.shape[1]
        seq = m.norm_pre(torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1))
        for i, block in enumerate(m.blocks):
            if layer_prompts is not None and i > 0:
                seq = torch.cat([seq[:, :n], layer_prompts(i), seq[:, n + p:]], dim=1)
            seq = block(seq)
        return self.head_features(torch.cat([seq[:, :n], seq[:, n + p:]], dim=1))

    def forward_with_extra_patches(self, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen forward from pixels only: the image plus extra position-free pixel patches."""
        return self.forward_tokens(x, self.patch_tokens(pixels))

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and timm's own pooling (CLS, avg over patches, map…) → (B, D)."""
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)
