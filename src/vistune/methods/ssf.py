"""SSF (Lian et al., NeurIPS 2022): Scale and Shift the deep Features after every operation.

y = γ ⊙ op(x) + β per output channel, for every op whose output is affine in its own weight and
bias: Linear and Conv2d with a bias, and LayerNorm / BatchNorm / GroupNorm with affine weights (on
ViT-B/16: patch embedding, qkv, proj, fc1, fc2, both LayerNorms of each block and the final norm).
Since such an op is affine, γ ⊙ op(x) + β is the same op with weight γ ⊙ W and bias γ ⊙ b + β, so we
run the stock module with those (``torch.func.functional_call``): this works inside any timm module
(e.g. BatchNormAct2d, whose activation follows the norm) and *is* the re-parameterised form that
merging writes into the weights. Ops without a bias (Swin's patch-merging reduction, EfficientNet's
convs, which are followed by a BatchNorm that SSF covers) are left out: folding a shift into them
would add a bias the stock model does not have.

Init: γ = 1, β = 0 (default), so step 0 is exactly the frozen model; ``init=paper`` draws
γ ~ N(1, 0.02), β ~ N(0, 0.02) as the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ..backbones.base import replace_module
from ..errors import VistuneError
from .base import Foldable, MethodConfig, ModuleTuner, option, register

AFFINE_OPS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


@dataclass
class SSFConfig(MethodConfig):
    init: Literal["identity", "paper"] = option(
        "identity", "identity: scale 1, shift 0 (step 0 = frozen model); paper: scale N(1, 0.02), shift N(0, 0.02)")


class ScaleShift(nn.Module, Foldable):
    """Runs a frozen affine op with weight γ ⊙ W and bias γ ⊙ b + β: exactly γ ⊙ op(x) + β."""

    def __init__(self, inner: nn.Module, init: str):
        super().__init__()
        self.inner = inner
        channels = inner.weight.shape[0]
        w = inner.weight
        self.scale = nn.Parameter(torch.ones(channels, device=w.device, dtype=w.dtype))
        self.shift = nn.Parameter(torch.zeros(channels, device=w.device, dtype=w.dtype))
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)

    def folded(self) -> dict[str, torch.Tensor]:
        """The op's weight and bias with the scale and shift folded in."""
        w = self.inner.weight
        scale = self.scale.view(-1, *[1] * (w.ndim - 1))
        return {"weight": w * scale, "bias": self.inner.bias * self.scale + self.shift}

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.folded(), args, kwargs)

    def merged(self) -> nn.Module:
        """The op itself with the folded weight and bias (same module type, same cost)."""
        with torch.no_grad():
            for name, value in self.folded().items():
                setattr(self.inner, name, nn.Parameter(value.detach().clone(), requires_grad=False))
        return self.inner


def ssf_ops(model: nn.Module) -> list[str]:
    """Names of the modules SSF follows: affine ops with a weight vector/matrix and a bias."""
    names, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # a targeted op's own children (e.g. BatchNormAct2d's activation)
        has_affine = getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None
        if isinstance(m, AFFINE_OPS) and has_affine:
            names.append(name)
            inside.append(name)
    return names


@register("ssf", category="parameter",
          description="SSF: learned scale and shift after every op with a bias and every norm layer; mergeable")
class SSF(ModuleTuner):
    Config = SSFConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    mergeable = True

    def attach(self):
        backbone, model = self.backbone, self.backbone.model
        names = ssf_ops(model)
        if not names:
            raise VistuneError(f"backbone {backbone.spec.name!r} has no op with a bias or norm layer for SSF",
                               "use another method (e.g. lora)")
        for name in names:
            replace_module(model, name, ScaleShift(model.get_submodule(name), self.config.init))
