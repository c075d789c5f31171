"""View over timm's VisionTransformer and kin (ViT, DeiT, DINOv2, CLIP, EVA-style models).

Handles CLS + register tokens, DeiT's distillation token, no-CLS avg-pool models and
CLIP-style ``norm_pre`` by using timm's own ``_pos_embed``/``norm_pre``/``forward_head``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import BackboneView


class ViTView(BackboneView):
    family = "vit"

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, register and distillation tokens that precede the patch tokens."""
        return self.model.num_prefix_tokens

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def final_modules(self) -> dict[str, nn.Module]:
        mods = {"norm": self.model.norm, "fc_norm": self.model.fc_norm}
        return {k: m for k, m in mods.items() if any(True for _ in m.parameters())}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels → token sequence [prefix tokens, patches] after the positional embedding."""
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

    def forward_with_extra_tokens(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """The frozen forward with position-free tokens ``extra`` (B, T, D) after the prefix tokens.

        They enter after the positional embedding and before ``norm_pre``, and their outputs are
        dropped before the final norm and pooling."""
        m = self.model
        tokens = m.patch_drop(m._pos_embed(m.patch_embed(x)))
        n = self.num_prefix_tokens
        tokens = m.blocks(m.norm_pre(torch.cat([tokens[:, :n], extra, tokens[:, n:]], dim=1)))
        return self.head_features(torch.cat([tokens[:, :n], tokens[:, n + extra.shape[1]:]], dim=1))

    def forward_with_extra_patches(self, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen forward from pixels only: the image plus extra position-free pixel patches."""
        return self.forward_with_extra_tokens(x, self.patch_tokens(pixels))

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and timm's own pooling (CLS, avg over patches, map…) → (B, D)."""
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)
