"""RepAdapter (Luo et al., 2023, "Towards Efficient Visual Adaption via Structural Re-parameterization").

A linear adapter before the attention and before the MLP of every block, on the normalised input h:
    A(h) = h + s · B(dropout(W_A h + b_A)),  B: group-wise (``groups`` blocks of h/g → D/g) + b_B
    x = x + Attn(A₁(LN₁(x)));   x = x + MLP(A₂(LN₂(x)))
as the official code (luogen1996/RepAdapter ``repadapter.py``: ``RepAdapter``, ``forward_vit_block_adapter``
for ``repblock``; dim 8, groups 2, dropout 0.1; W_A Xavier-uniform, W_B and both biases zero; s chosen per task
from {0.1, 0.5, 1, 5, 10}, default 1). ``placement=attn`` is the code's ``repattn`` (before the attention only).

Structural re-parameterisation (``mergeable``): A is affine, A(h) = M h + c with M = I + s·B_dense·W_A and
c = s·(B_dense b_A + b_B), so every Linear L(h) = W h + b of the sub-layer that reads h folds it in:
L(A(h)) = (W M) h + (W c + b). ``vistune export --merged`` writes a plain timm model (stock modules, stock
parameter count) with the adapted model's logits, so merged inference costs what the bare backbone costs.
The Linears that read a sub-layer's input are found in one dummy pass (timm's ``qkv`` and, where present, the
attention ``gate``; ``fc1``, or a GLU's ``fc1_g``/``fc1_x``), and the fold is checked once at build time on a
random adapter, so nothing that trains can fail to merge. Refused: sub-layers that read their input other than
through Linear modules (BEiT, EVA-02 and Swin V2 attentions apply ``qkv.weight`` with separate q/v biases
through ``F.linear``), Linears without a bias while the adapter has biases (``--set bias=false``), and backbones
without transformer blocks (the ``attn-mlp`` seam). On Swin the adapter acts per token inside the window
attention, the same as before the window partition except on the zero tokens that pad a map whose size is not a
multiple of the window (those then get the adapter's constant shift, in training and merged alike).

Tuned parameters per adapter: D·h + h + D·h/g + D: ViT-B/16, h = 8, g = 2, both placements:
24 · 9,992 = 239,808 (the official code's modules; 221,184 of them weights).
Recipe of the official code: AdamW lr 1e-3 at batch 64 (vistune: base lr 4e-3 × batch/256), weight decay 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones.base import replace_module
from ..errors import VistuneError
from .adapter_common import Before, Branch, branches, dataflow
from .base import Foldable, MethodConfig, ModuleTuner, option, register


@dataclass
class RepAdapterConfig(MethodConfig):
    bottleneck: int = option(8, "hidden width h of each adapter (official 8)")
    groups: int = option(2, "groups g of the up-projection B (block-diagonal: g blocks of h/g → D/g; official 2)")
    scale: float = option(1.0, "s: A(h) = h + s·B(W_A h) (official: per task from 0.1-10, default 1)")
    dropout: float = option(0.1, "dropout on the hidden units while training (official 0.1)")
    placement: Literal["block", "attn"] = option(
        "block", "block = before the attention and before the MLP (official repblock); attn = before the "
                 "attention only (repattn)")
    bias: bool = option(True, "biases b_A and b_B (official: yes; off for backbones whose Linears have no bias)")

    def validate(self):
        if self.bottleneck < 1 or self.groups < 1:
            raise VistuneError(f"repadapter: bottleneck={self.bottleneck} and groups={self.groups} must be ≥ 1")
        if self.bottleneck % self.groups:
            raise VistuneError(f"repadapter: bottleneck={self.bottleneck} is not divisible by groups={self.groups}",
                               "e.g. --set bottleneck=8 groups=2")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"repadapter: dropout={self.dropout} must be in [0, 1)", "e.g. --set dropout=0.1")


class LinearAdapter(Branch):
    """h + s · B(dropout(W_A h + b_A)), B block-diagonal with ``groups`` blocks: an affine map of the last dim."""

    def __init__(self, dim: int, hidden: int, groups: int, scale: float, dropout: float, bias: bool):
        super().__init__()
        if dim % groups:
            raise VistuneError(f"repadapter: width {dim} is not divisible by groups={groups}", "use --set groups=1")
        self.down = nn.Linear(dim, hidden, bias=bias)
        self.up_weight = nn.Parameter(torch.zeros(groups, dim // groups, hidden // groups))
        self.up_bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.dropout, self.scale, self.groups = nn.Dropout(dropout), scale, groups
        nn.init.xavier_uniform_(self.down.weight)
        if bias:
            nn.init.zeros_(self.down.bias)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...gi,goi->...go", z.unflatten(-1, (self.groups, -1)), self.up_weight).flatten(-2)
        return y if self.up_bias is None else y + self.up_bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(self.down(h))) * self.scale

    def affine(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M, c) with A(h) = M h + c in eval mode (c None without biases)."""
        up = torch.block_diag(*self.up_weight)  # (D, h)
        m = torch.eye(up.shape[0], dtype=up.dtype, device=up.device) + self.scale * up @ self.down.weight
        if self.up_bias is None:
            return m, None
        return m, self.scale * (up @ self.down.bias + self.up_bias)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, scale={self.scale}"


def folded(adapter: LinearAdapter, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The weights and biases of ``linears`` (by name in their sub-layer) with the adapter folded in."""
    m, c = adapter.affine()
    out = {}
    for name, linear in linears.items():
        out[f"{name}.weight"] = linear.weight @ m
        if c is not None:
            out[f"{name}.bias"] = linear.weight @ c + linear.bias
    return out


class Reparameterised(Before, Foldable):
    """A frozen sub-layer with a linear adapter on its input; ``merged()`` folds the adapter into ``linears``."""

    def __init__(self, inner: nn.Module, adapter: LinearAdapter):
        super().__init__(inner, adapter)
        self.linears: list[str] = []  # the Linears of ``inner`` that read its input (found by RepAdapter.attach)

    def merged(self) -> nn.Module:
        linears = {n: self.inner.get_submodule(n) for n in self.linears}
        with torch.no_grad():
            tensors = folded(self.branch, linears)
            for name, linear in linears.items():
                linear.weight = nn.Parameter(tensors[f"{name}.weight"].clone(), requires_grad=False)
                if f"{name}.bias" in tensors:
                    linear.bias = nn.Parameter(tensors[f"{name}.bias"].clone(), requires_grad=False)
        return self.inner


@register("repadapter", category="parameter", needs=("attn-mlp",),
          description="RepAdapter: group-wise linear adapters before the attention and the MLP, re-parameterised "
                      "into qkv / fc1 (mergeable: the merged model costs the bare backbone)")
class RepAdapter(ModuleTuner):
    Config = RepAdapterConfig
    default_optimizer = "adamw"
    # measured (docs/defaults.md): the official AdamW 1e-3 at batch 64 (base 4e-3) reached 0.44 of the grid's best in
    # a 4-epoch run; only the grid's top, 0.1, reached ≥ 90 %
    default_lrs = {"adamw": 0.1}
    supports_segmentation = True  # adapt(..., task="segmentation"): FPN decoder head (methods/decoder.py)
    mergeable = True

    def attach(self):
        backbone, config = self.backbone, self.config
        slots = ("attn", "mlp") if config.placement == "block" else ("attn",)
        subs = [(f"{slot} of block {i}", block, slot) for i, block in enumerate(backbone.blocks()) for slot in slots]
        linears = [[(n, m) for n, m in getattr(b, s).named_modules() if n and isinstance(m, nn.Linear)] for _, b, s in subs]
        calls = dataflow(backbone, [getattr(b, s) for _, b, s in subs] + [m for ls in linears for _, m in ls])
        linear_calls = iter(calls[len(subs):])
        checked: set[tuple] = set()
        for (label, block, slot), candidates, call in zip(subs, linears, calls):
            if call.input is None:
                raise VistuneError(f"repadapter: the {label} of {backbone.spec.name!r} is not called as a module on "
                                   "one tensor", "use another method (lora, ssf)")
            # the sub-layer's Linears that read exactly its input: where the adapter folds in
            found = [name for name, _ in candidates if next(linear_calls).input is call.input]
            kind = (type(getattr(block, slot)), tuple(found))
            self._check_foldable(label, getattr(block, slot), found, call, verify=kind not in checked)
            checked.add(kind)  # the same module code with the same Linears: its use of the input is checked once
            adapter = LinearAdapter(call.input.shape[-1], config.bottleneck, config.groups, config.scale,
                                    config.dropout, config.bias)
            wrapper = Reparameterised(getattr(block, slot), adapter)
            wrapper.linears = found
            setattr(block, slot, wrapper)

    def _check_foldable(self, label: str, sub: nn.Module, found: list[str], call, verify: bool) -> None:
        """Refuse a sub-layer the adapter cannot fold into: no Linear reads its input, a Linear without a bias, or
        (``verify``) an input used beyond those Linears — checked on a random adapter: the sub-layer on the adapted
        input must equal the sub-layer whose Linears alone see the adapted input."""
        backbone, config = self.backbone, self.config
        where = f"the {label} of {backbone.spec.name!r} ({type(sub).__name__})"
        fix = "use lora or ssf, which merge on this backbone, or a ViT/DeiT/Swin V1 backbone"
        if not found:
            raise VistuneError(f"repadapter: {where} reads its input through no Linear module (e.g. F.linear on "
                               "qkv.weight with separate q/v biases), so the adapter cannot be re-parameterised into "
                               "it", fix)
        no_bias = [n for n in found if sub.get_submodule(n).bias is None]
        if no_bias and config.bias:
            raise VistuneError(f"repadapter: the Linear {no_bias[0]} of {where} has no bias, so the adapter's bias "
                               "cannot be folded into it", "use --set bias=false")
        if not verify:
            return
        generator = torch.Generator().manual_seed(0)
        probe = LinearAdapter(call.input.shape[-1], config.bottleneck, config.groups, config.scale, 0.0, config.bias)
        with torch.no_grad():
            for p in probe.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            probe.to(call.input)
            h = torch.randn(call.input.shape, generator=generator).to(call.input)
            want = sub(probe(h), *call.args, **call.kwargs)
            originals = {n: sub.get_submodule(n) for n in found}
            try:
                for n, linear in originals.items():
                    replace_module(sub, n, nn.Sequential(probe, linear))
                got = sub(h, *call.args, **call.kwargs)
            finally:
                for n, linear in originals.items():
                    replace_module(sub, n, linear)
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6):
            raise VistuneError(f"repadapter: {where} uses its input beyond the Linears {', '.join(found)}, so "
                               "folding the adapter into them would change the function", fix)

    def backbone_train_modules(self) -> list[nn.Module]:
        return branches(self.backbone.model)
