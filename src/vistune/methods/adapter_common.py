"""What the adapter-family methods share (AdaptFormer, Convpass, Houlsby, Adapter+, RepAdapter).

- :class:`Branch`: the base of every trainable module these methods put into a backbone. The backbone runs in eval
  mode while training; these methods switch only their branches to train mode (``backbone_train_modules``), so
  a branch's dropout / drop-path acts while training and the frozen modules' never does.
- :class:`Bottleneck`: ``scale · up(dropout(act(down(x))))`` over the last dimension, with the papers' inits.
- three joints of a branch to a frozen module, which keep the frozen module itself (and so every seam of timm's
  forward): :class:`After` (``y = inner(x); y + branch(y)``: sequential adapters), :class:`Before`
  (``inner(branch(x))``: RepAdapter) and :class:`Beside` (``inner(x) + branch(x)``: parallel adapters; with
  ``norm`` the sub-layer's pre-norm is moved inside, so that the branch reads the un-normalised stream).
- :func:`dataflow`: what each module reads and returns in one dummy pass of the frozen model — to check that a
  block is pre-norm (its ``mlp`` reads ``norm2``'s output) and to find the Linears that read a sub-layer's input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from timm.layers import DropPath
from torch import nn

from ..backbones import BackboneView
from ..errors import VistuneError

Init = Literal["lora", "xavier", "houlsby"]


class QuickGELU(nn.Module):
    """x · σ(1.702 x), CLIP's GELU approximation (Convpass's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "quick_gelu": QuickGELU}


class Branch(nn.Module):
    """A trainable module an adapter method puts into the backbone (runs in train mode while training)."""


def init_down_up(down: nn.Linear, up: nn.Linear, init: Init, std: float = 0.01) -> None:
    """``lora``: down Kaiming-uniform (a = √5, PyTorch's Linear default), up zeros (AdaptFormer's code);
    ``xavier``: down Xavier-uniform, up zeros (Convpass's, RepAdapter's); ``houlsby``: both truncated normal
    (std, cut at ±2 std), near the identity (Houlsby's, Adapter+'s). Biases zero in every case."""
    if init == "houlsby":
        for layer in (down, up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    else:
        if init == "lora":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        else:
            nn.init.xavier_uniform_(down.weight)
        nn.init.zeros_(up.weight)
    for layer in (down, up):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class Bottleneck(Branch):
    """``scale · channel_scale ⊙ drop_path(up(dropout(act(down(x)))))`` over the last dimension (no skip)."""

    def __init__(self, dim: int, hidden: int, *, act: str, init: Init, std: float = 0.01, dropout: float = 0.0,
                 scale: float = 1.0, channel_scale: bool = False, drop_path: float = 0.0):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, hidden), ACTIVATIONS[act](), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale = scale
        self.channel_scale = nn.Parameter(torch.ones(dim)) if channel_scale else None
        init_down_up(self.down, self.up, init, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.up(self.dropout(self.act(self.down(x)))))
        if self.channel_scale is not None:
            y = y * self.channel_scale
        return y * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _on_channels(branch: nn.Module, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    channel_dim %= y.ndim
    if channel_dim == y.ndim - 1:
        return branch(y)
    # an explicit permutation of non-negative dims: the ONNX export of movedim(1, -1) wrote perm (0, -1, 1, 2),
    # which onnxruntime refuses
    order = [d for d in range(y.ndim) if d != channel_dim] + [channel_dim]
    inverse = sorted(range(y.ndim), key=order.__getitem__)
    return branch(y.permute(order)).permute(inverse)


class After(nn.Module):
    """A frozen module, then a branch with a skip on its output: ``y + branch(y)``, the branch acting on the
    channels at ``channel_dim`` (1: NCHW feature maps; -1: tokens and channels-last maps)."""

    def __init__(self, inner: nn.Module, branch: Branch, channel_dim: int = -1):
        super().__init__()
        self.inner, self.branch, self.channel_dim = inner, branch, channel_dim

    def forward(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        return y + _on_channels(self.branch, y, self.channel_dim)


class Before(nn.Module):
    """A branch, then the frozen module on its output: ``inner(branch(x))`` (the branch holds its own skip)."""

    def __init__(self, inner: nn.Module, branch: Branch):
        super().__init__()
        self.inner, self.branch = inner, branch

    def forward(self, x, *args, **kwargs):
        return self.inner(self.branch(x), *args, **kwargs)


class Beside(nn.Module):
    """A frozen sub-layer and a parallel branch: ``inner(x) + branch(x)``. With ``norm`` (the sub-layer's pre-norm,
    moved here from the block, whose own slot then holds an ``nn.Identity``): ``inner(norm(x)) + branch(x)``, so
    the branch reads the residual stream the sub-layer's norm reads."""

    def __init__(self, inner: nn.Module, branch: Branch, norm: nn.Module | None = None):
        super().__init__()
        self.inner, self.branch, self.norm = inner, branch, norm

    def forward(self, x, *args, **kwargs):
        h = x if self.norm is None else self.norm(x)
        return self.inner(h, *args, **kwargs) + self.branch(x)


def branches(model: nn.Module) -> list[Branch]:
    """Every :class:`Branch` inside ``model`` (what the methods run in train mode while training)."""
    return [m for m in model.modules() if isinstance(m, Branch)]


@dataclass
class Call:
    """One module's first call in a dummy pass: its first positional input, the other arguments, its output."""

    input: torch.Tensor | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: object = None


def dataflow(view: BackboneView, modules: list[nn.Module]) -> list[Call]:
    """Each module's first call in one dummy pass of the model (eval mode, no gradients, no random draws); a
    module the forward never calls as a module gets an empty :class:`Call`. Tensors are kept as the objects the
    forward passed, so ``a.output is b.input`` says that ``b`` reads exactly what ``a`` returned."""
    calls: dict[int, Call] = {}

    def pre(module, args, kwargs):
        if id(module) not in calls:
            first = args[0] if args and torch.is_tensor(args[0]) else None
            calls[id(module)] = Call(first, tuple(args[1:]), dict(kwargs))

    def post(module, args, kwargs, output):
        call = calls[id(module)]
        if call.output is None:
            call.output = output

    hooks = []
    for m in modules:
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    model = view.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model.forward_features(torch.zeros(1, 3, *view.input_size(), device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [calls.get(id(m), Call()) for m in modules]


def pre_norm_mlps(view: BackboneView, method: str) -> list[tuple[nn.Module, int]]:
    """(block, width) of each transformer block of ``view``, checked to be pre-norm around the MLP: ``mlp`` reads
    ``norm2``'s output (ViT, DeiT, EVA, BEiT, Swin V1 — not Swin V2 or timm's res-post-norm blocks, whose
    ``norm2`` follows the MLP)."""
    blocks = view.blocks()
    names = view.module_names(blocks)
    missing = [n for n, b in zip(names, blocks) if not (hasattr(b, "norm2") and hasattr(b, "mlp"))]
    if missing:
        raise VistuneError(f"{method}: block {missing[0]} of {view.spec.name!r} has no norm2 and mlp sub-layers",
                           "use a backbone built from timm's ViT/EVA/BEiT/Swin blocks, or another method")
    calls = dataflow(view, [m for b in blocks for m in (b.norm2, b.mlp)])
    for i, name in enumerate(names):
        norm, mlp = calls[2 * i], calls[2 * i + 1]
        if mlp.input is None or norm.output is not mlp.input:
            raise VistuneError(
                f"{method}: in block {name} of {view.spec.name!r} ({type(blocks[i]).__name__}) the MLP does not read "
                "norm2's output (a res-post-norm block such as Swin V2's normalises after the MLP), so there is no "
                "pre-norm MLP sub-layer to put the adapter beside",
                "use a pre-norm transformer (ViT, DeiT, EVA, BEiT, Swin V1), or the adapter / houlsby methods")
    return [(b, calls[2 * i + 1].input.shape[-1]) for i, b in enumerate(blocks)]
