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

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm and timm's own pooling (CLS, avg over patches, map…) → (B, D)."""
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)
