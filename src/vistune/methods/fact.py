"""FacT (Jie & Deng, AAAI 2023): the weight increments of all layers as one tensor, factorised and shared.

Every targeted weight of a transformer block is seen as a grid of d×d blocks (d: the block's width; the fused qkv
is 3×1 blocks, fc1 of a ViT-B 4×1, fc2 1×4). FacT stacks the increments ΔW of all of them into one d×d×n tensor and
factorises it with factors U (d→r) and V (r→d) shared by every layer, so each block of ΔW is V·Σ·U with a small
r×r core Σ; the layer computes W x + s·ΔW x:

- **FacT-TT** (tensor-train): each weight has its own core Σ ∈ R^{a·r × b·r} (a×b blocks of r×r);
  ViT-B: 12 r² per block, 1536 r + 144 r² in all.
- **FacT-TK** (Tucker): one core C ∈ R^{r×r×r} and one factor P ∈ R^{r × n}, n the number of d×d blocks (12 per
  ViT block): the cores are C ×₃ P; ViT-B: 1536 r + r³ + 144 r.

Placement, init and defaults follow the official code (JieShibo/PETL-ViT ``FacT/fact_tt.py``, ``fact_tk.py``; the
same in OSU-MLB/PETL_Vision ``model/fact.py``): q, k, v, proj, fc1 and fc2 of every block; U default Linear init,
V zero (so step 0 is the frozen model), TT cores default Linear init, TK's C and P Xavier-uniform; dropout 0.1 on
the r-dimensional path before V; the increment is computed on the activations (U x → core → V). TK follows the
code's index layout too: q, k, v, proj take one slice C ×₃ p_j each, while fc1 and fc2 reshape their stacked slices
(r, r, 4) → (r, 4r), which interleaves the four slices across the four d×d blocks.

Widths: U and V are shared by all blocks of one width (ViT, EVA, BEiT: one pair; Swin: one per stage width, our
extension); a Linear is targeted when its input and output are multiples of d, one of them d (EVA-02's SwiGLU, of
width 8d/3, is left out). Attentions that read the qkv weight directly (BEiT, EVA-02, Swin V2: ``F.linear`` with
q/v biases) see W + s·ΔW through the wrapper's ``weight`` (without the dropout). Mergeable: W + s·ΔW is one plain
Linear, so the merged model is the stock timm model.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ATTENTION_BLOCKS, replace_module
from ..errors import VistuneError
from .base import Borrowed, Foldable, MethodConfig, ModuleTuner, option, register


@dataclass
class FacTConfig(MethodConfig):
    rank: int = option(8, "r: width of the shared factors U (d→r), V (r→d) and the cores (official configs: 4, 8 "
                          "or 16 for TT, 16 or 32 for TK)")
    scale: float = option(1.0, "s: the layer computes W x + s·ΔW x (official per-task grid 0.01 … 100)")
    dropout: float = option(0.1, "dropout on the r-dimensional path before V (official: 0.1)")

    def validate(self):
        name = self.method or "fact"
        if self.rank < 1:
            raise VistuneError(f"{name}: rank={self.rank} must be ≥ 1", "use e.g. --set rank=8")
        if self.scale <= 0:
            raise VistuneError(f"{name}: scale={self.scale} must be > 0")
        if not 0 <= self.dropout < 1:
            raise VistuneError(f"{name}: dropout={self.dropout} must be in [0, 1)")


@dataclass
class FacTTKConfig(FacTConfig):
    rank: int = option(32, "r: width of the shared factors U, V and of the core C (r×r×r) (official configs: 16 "
                           "or 32)")
    scale: float = option(10.0, "s: the layer computes W x + s·ΔW x (official per-task grid 0.01 … 100; 10 on most)")


@dataclass(frozen=True)
class Target:
    """One targeted Linear: a×b blocks of d×d; TK reads its cores from P's columns [first, first + a·b)."""

    name: str
    width: int
    out_blocks: int
    in_blocks: int
    first: int
    layout: Literal["sliced", "interleaved"]  # how TK lays its slices out (the official code's attn / mlp)

    @property
    def blocks(self) -> int:
        return self.out_blocks * self.in_blocks


class Factors(nn.Module, abc.ABC):
    """FacT's shared factors and cores; ``core(t)`` is the (a·r × b·r) core Σ of target ``t``."""

    def __init__(self, widths: list[int], rank: int, scale: float, dropout: float):
        super().__init__()
        self.rank, self.scale = rank, scale
        self.u = nn.ModuleDict({str(d): nn.Linear(d, rank, bias=False) for d in widths})
        self.v = nn.ModuleDict({str(d): nn.Linear(rank, d, bias=False) for d in widths})
        for v in self.v.values():
            nn.init.zeros_(v.weight)
        self.dropout = nn.Dropout(dropout)

    @abc.abstractmethod
    def core(self, t: Target) -> torch.Tensor:
        """The (a·r × b·r) core of target ``t``, as a Linear weight (it maps U x of the b input blocks to the a
        output blocks)."""

    def delta(self, t: Target, x: torch.Tensor) -> torch.Tensor:
        """s·ΔW x on the activations: x (…, b·d) → U per block → core → dropout → V per block → (…, a·d)."""
        r, lead = self.rank, x.shape[:-1]
        xu = self.u[str(t.width)](x.reshape(*lead, t.in_blocks, t.width)).reshape(*lead, t.in_blocks * r)
        h = self.dropout(F.linear(xu, self.core(t)))
        return self.v[str(t.width)](h.reshape(*lead, t.out_blocks, r)).reshape(*lead, -1) * self.scale

    def delta_weight(self, t: Target) -> torch.Tensor:
        """s·ΔW (a·d × b·d): block (i, j) = V · Σ_ij · U."""
        r, d = self.rank, t.width
        core = self.core(t).reshape(t.out_blocks, r, t.in_blocks, r)
        u, v = self.u[str(d)].weight, self.v[str(d)].weight  # (r, d), (d, r)
        return torch.einsum("dp,ipjq,qe->idje", v, core, u).reshape(t.out_blocks * d, t.in_blocks * d) * self.scale


class TensorTrain(Factors):
    """FacT-TT: a core of its own per target (default Linear init, as the official ``nn.Linear`` cores)."""

    def __init__(self, widths, rank, scale, dropout, targets: list[Target]):
        super().__init__(widths, rank, scale, dropout)
        self.cores = nn.ParameterList()
        for t in targets:
            core = nn.Linear(t.in_blocks * rank, t.out_blocks * rank, bias=False).weight
            self.cores.append(nn.Parameter(core.detach()))
        self._index = {t.name: i for i, t in enumerate(targets)}

    def core(self, t):
        return self.cores[self._index[t.name]]


class Tucker(Factors):
    """FacT-TK: one core C (r×r×r) and P (r × blocks), both Xavier-uniform as the official code."""

    def __init__(self, widths, rank, scale, dropout, num_blocks: int):
        super().__init__(widths, rank, scale, dropout)
        self.c = nn.Parameter(torch.empty(rank, rank, rank))
        self.p = nn.Parameter(torch.empty(rank, num_blocks))
        nn.init.xavier_uniform_(self.c)
        nn.init.xavier_uniform_(self.p)

    def core(self, t):
        r, n = self.rank, t.blocks
        slices = self.c @ self.p[:, t.first:t.first + n]  # (r, r, n): the code's FacTc @ FacTp[:, idx:idx + n]
        if t.layout == "interleaved":  # the code's MLP: (r, r, n) → (r, n·r), used as x @ M (fc1) or x @ Mᵀ (fc2)
            m = slices.reshape(r, n * r)
            return m.t() if t.in_blocks == 1 else m
        # the code's attention: x @ slice_j for block j
        per_block = [slices[:, :, j].t() for j in range(n)]
        return torch.cat(per_block, dim=0 if t.in_blocks == 1 else 1)


class FacTLinear(nn.Linear, Foldable):
    """A frozen Linear plus FacT's increment: W x + b + s·ΔW x.

    ``weight`` is W + s·ΔW, so attentions that read the weight instead of calling the module see the increment too.
    Its factors are the method's (``Borrowed``: saved once, under the method)."""

    def __init__(self, inner: nn.Linear, factors: Factors, target: Target):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no parameters of its own
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self._factors, self.target = Borrowed(factors), target

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight + self._factors.value.delta_weight(self.target).to(self.inner.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.inner.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self._factors.value.delta(self.target, x)

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + s·ΔW (a copy: the frozen weight is not touched)."""
        w = self.inner.weight
        plain = nn.Linear(self.in_features, self.out_features, bias=self.inner.bias is not None, device=w.device,
                          dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight)
            if plain.bias is not None:
                plain.bias.copy_(self.inner.bias)
        return plain.requires_grad_(False)


def find_targets(backbone) -> list[Target]:
    """Every Linear of each block's attention and MLP whose sizes are multiples of the block width, in block order
    (the attention's before the MLP's, each module's in its own order: qkv, proj, fc1, fc2 on a ViT)."""
    targets, first = [], 0
    for block in backbone.blocks():
        proj = getattr(getattr(block, "attn", None), "proj", None)
        if not isinstance(proj, nn.Linear) or not isinstance(getattr(block, "mlp", None), nn.Module):
            raise VistuneError(f"fact: block {backbone.module_names([block])[0]} of {backbone.spec.name!r} "
                               f"({type(block).__name__}) has no attn.proj Linear and mlp", "use lora or ssf")
        d = proj.out_features
        for part, layout in ((block.attn, "sliced"), (block.mlp, "interleaved")):
            for sub, m in part.named_modules():
                if not isinstance(m, nn.Linear) or m.in_features % d or m.out_features % d:
                    continue
                a, b = m.out_features // d, m.in_features // d
                if a > 1 and b > 1:
                    continue
                name = backbone.module_names([part])[0] + "." + sub
                targets.append(Target(name, d, a, b, first, layout))
                first += a * b
    if not targets:
        raise VistuneError(f"fact: no attention or MLP Linear of {backbone.spec.name!r} has a size that is a multiple "
                           "of its block's width", "use lora or ssf on this backbone")
    return targets


class FacT(ModuleTuner):
    """Shared by FacT-TT and FacT-TK (``tensor_format``)."""

    mergeable = True
    default_optimizer = "adamw"  # the official recipe: AdamW, lr 1e-3 at batch 64 (base 4e-3), weight decay 1e-4
    tensor_format: str

    def attach(self):
        backbone, c = self.backbone, self.config
        targets = find_targets(backbone)
        widths = sorted({t.width for t in targets})
        if self.tensor_format == "tt":
            self.factors = TensorTrain(widths, c.rank, c.scale, c.dropout, targets)
        else:
            self.factors = Tucker(widths, c.rank, c.scale, c.dropout, sum(t.blocks for t in targets))
        for t in targets:
            replace_module(backbone.model, t.name, FacTLinear(backbone.model.get_submodule(t.name), self.factors, t))


@register("fact-tt", category="parameter", needs=(ATTENTION_BLOCKS,),
          description="FacT-TT: ΔW of q,k,v,proj,fc1,fc2 in all blocks from shared factors U, V and a small core per "
                      "weight (tensor-train); mergeable")
class FacTTT(FacT):
    Config = FacTConfig
    tensor_format = "tt"
    # measured (docs/defaults.md): the official base 4e-3 reached 0.52 of the grid's best in a 4-epoch run; 0.05,
    # the lowest grid lr that reached ≥ 90 % on fashion-mnist, then reached 0.80 on digits; 0.2 ≥ 0.99 on both
    default_lrs = {"adamw": 0.2}


@register("fact-tk", category="parameter", needs=(ATTENTION_BLOCKS,),
          description="FacT-TK: ΔW of q,k,v,proj,fc1,fc2 in all blocks from shared factors U, V, P and one r×r×r "
                      "core (Tucker); mergeable")
class FacTTK(FacT):
    Config = FacTTKConfig
    tensor_format = "tk"
    # measured (docs/defaults.md): 0.02, the lowest grid lr that reached ≥ 90 % of the best on fashion-mnist in a
    # 4-epoch run, then reached 0.81 on digits; 0.05 is the best on both
    default_lrs = {"adamw": 0.05}


__all__ = ["FacTConfig", "FacTTKConfig", "FacTLinear", "Factors", "TensorTrain", "Tucker", "Target", "find_targets"]
