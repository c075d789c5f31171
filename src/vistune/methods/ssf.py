"""SSF (Lian et al., NeurIPS 2022): Scale and Shift the deep Features after every operation.

y = γ ⊙ op(x) + β per output channel, for every op whose output is affine in its own weight and
bias: Linear and Conv2d with a bias, and LayerNorm / BatchNorm / GroupNorm with affine weights (on
ViT-B/16: patch embedding, qkv, proj, fc1, fc2, both LayerNorms of each block and the final norm).
Ops without a bias (Swin's patch-merging reduction, EfficientNet's convs, which are followed by a
BatchNorm that SSF covers) are left out: folding a shift into them would add a bias the stock model
does not have.

How each op runs in training, and why (the form is chosen per op type, see :class:`ScaleShift`):

- **Linear, Conv2d: on the op's output**, γ ⊙ op(x) + β on the output channel dim (last for a
  Linear, dim 1 for a Conv2d). The frozen op then needs no weight gradient and saves no input, so
  SSF costs about what a frozen backbone's backward costs. Folding γ into W instead (γ ⊙ W) would make
  autograd compute every full weight gradient and save every op input, as full fine-tuning does. A
  Linear's scale-shift saves its *output* z, not op(x): γ's gradient is Σ g ⊙ (z − β) / γ, and the
  next op usually saves z anyway (attention's q/k/v are views of the qkv output; the MLP's activation
  saves the fc1 output), so the two share one tensor. A Conv2d's saves op(x) (CNNs often overwrite a
  conv's output with an in-place activation, which a saved output would not survive).
- **Weight-standardised convs.** timm's ``StdConv2d``/``StdConv2dSame`` standardise W on every forward,
  which undoes a scale folded into W: the folded form computed sign(γ) ⊙ conv(x) + γ ⊙ b + β there, not
  SSF, and no same-type merged form exists, so SSF leaves them out (timm builds them without a bias
  anyway). ``ScaledStdConv2d`` (NFNets) scales the standardised W by its own per-channel ``gain``:
  SSF runs on its output and merges into ``gain``.
- **Norm layers: folded**, the norm run with weight γ ⊙ w and bias γ ⊙ b + β
  (``torch.func.functional_call``). That is exactly γ ⊙ norm(x) + β, and it stays exact inside timm's
  fused norm + activation modules (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``), where SSF
  scales the norm's output *before* the activation, which running on the module's output could not
  do. Folding vectors costs nothing, and a norm's backward does the same work either way.

Merging (:meth:`ScaleShift.merged`) always folds: W ← γ ⊙ W (``ScaledStdConv2d``: gain ← γ ⊙ gain),
b ← γ ⊙ b + β, the same module type.

Init: γ = 1, β = 0 (default), so step 0 is exactly the frozen model; ``init=paper`` draws
γ ~ N(1, 0.02), β ~ N(0, 0.02) as the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn
from torch.func import functional_call

from ..backbones.base import ForwardsAttributes, replace_module
from ..errors import VistuneError
from .base import Foldable, MethodConfig, ModuleTuner, option, register

AFFINE_OPS = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
OUTPUT_SIDE_OPS = (nn.Linear, nn.Conv2d)  # run as γ ⊙ op(x) + β; the others (norms) run folded
STANDARDISED_CONVS = (StdConv2d, StdConv2dSame)  # standardisation undoes a folded scale: not SSF's ops
GAIN_CONVS = (ScaledStdConv2d, ScaledStdConv2dSame)  # the scale folds into their per-channel gain


@dataclass
class SSFConfig(MethodConfig):
    init: Literal["identity", "paper"] = option(
        "identity", "identity: scale 1, shift 0 (step 0 = frozen model); paper: scale N(1, 0.02), shift N(0, 0.02)")


class ScaleShiftFromOutput(torch.autograd.Function):
    """z = op_output ⊙ γ + β on the last dim, saving z (not op_output) for the backward.

    γ's gradient needs op_output = (z − β) / γ: Σ g ⊙ z − β ⊙ Σ g, divided by γ. Saving z costs nothing
    where the next op saves it too (a shared tensor), so the scale-shift adds no activation memory there.
    γ is a scale that stays near 1 (init 1 or N(1, 0.02)); an exact zero would give an inf gradient, which
    the trainer stops on as a divergence."""

    @staticmethod
    def forward(ctx, op_output: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(shift, op_output, scale)
        ctx.save_for_backward(out, scale, shift)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, scale, shift = ctx.saved_tensors
        dims = tuple(range(grad.ndim - 1))
        grad_shift = grad.sum(dims)
        grad_scale = ((grad * out).sum(dims) - shift * grad_shift) / scale
        return grad * scale, grad_scale, grad_shift


class ScaleShift(ForwardsAttributes, nn.Module, Foldable):
    """γ ⊙ op(x) + β around a frozen op: on the output of a Linear/Conv2d, folded into a norm's affine."""

    def __init__(self, inner: nn.Module, init: str, output_overwritten: bool = False):
        super().__init__()
        # a Linear whose output the model overwrites in place (Swin V2's cpb_mlp: Linear → ReLU(inplace); NaFlexViT's
        # patch embedding += position): the saved-output form would find its saved tensor changed, so it saves op(x)
        # as a Conv2d's does. Found by SSF.attach's one dummy pass (:func:`_call_survey`)
        self.output_overwritten = output_overwritten
        w = inner.weight
        # registered before ``inner``: __getattr__ would otherwise find the op's own attribute of the same name
        # (ScaledStdConv2d.scale) and refuse the parameter
        self.scale = nn.Parameter(torch.ones(w.shape[0], device=w.device, dtype=w.dtype))
        self.shift = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
        self.inner = inner
        if init == "paper":
            nn.init.normal_(self.scale, mean=1.0, std=0.02)
            nn.init.normal_(self.shift, std=0.02)

    def folded(self) -> dict[str, torch.Tensor]:
        """The op's parameters with the scale and shift folded in (its merged form)."""
        if isinstance(self.inner, GAIN_CONVS):
            scaled = {"gain": self.inner.gain * self.scale.view(-1, 1, 1, 1)}
        else:
            w = self.inner.weight
            scaled = {"weight": w * self.scale.view(-1, *[1] * (w.ndim - 1))}
        return {**scaled, "bias": self.inner.bias * self.scale + self.shift}

    def forward(self, *args, **kwargs):
        if not isinstance(self.inner, OUTPUT_SIDE_OPS):
            return functional_call(self.inner, self.folded(), args, kwargs)
        out = self.inner(*args, **kwargs)
        # in the op's precision (bf16 under autocast), as the folded op computed; γ's gradient returns in fp32
        scale, shift = self.scale.to(out.dtype), self.shift.to(out.dtype)
        if isinstance(self.inner, nn.Linear) and not self.output_overwritten:
            return ScaleShiftFromOutput.apply(out, scale, shift)
        if isinstance(self.inner, nn.Linear):
            return torch.addcmul(shift, out, scale)
        return torch.addcmul(shift.view(-1, 1, 1), out, scale.view(-1, 1, 1))


    def merged(self) -> nn.Module:
        """The op itself with the folded parameters (same module type, same cost)."""
        with torch.no_grad():
            for name, value in self.folded().items():
                setattr(self.inner, name, nn.Parameter(value.detach().clone(), requires_grad=False))
        return self.inner


def _call_survey(backbone, modules: list[nn.Module]) -> tuple[list[bool], list[bool]]:
    """One dummy pass of the stock model: which of ``modules`` its forward calls as modules (an attention may read
    a weight directly), and which Linears' outputs it then changes in place (an in-place op bumps the tensor's
    version counter)."""
    called, outputs = set(), {}

    def record(module, args, output) -> None:
        called.add(id(module))
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
            outputs.setdefault(id(module), (output, output._version))

    backbone.dummy_forward([m.register_forward_hook(record) for m in modules])
    overwritten = [id(m) in outputs and outputs[id(m)][0]._version != outputs[id(m)][1] for m in modules]
    return [id(m) in called for m in modules], overwritten


def ssf_ops(model: nn.Module) -> list[str]:
    """Names of the modules SSF follows: affine ops with a weight vector/matrix and a bias."""
    names, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue  # a targeted op's own children (e.g. BatchNormAct2d's activation)
        has_affine = getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None
        if isinstance(m, AFFINE_OPS) and has_affine and not isinstance(m, STANDARDISED_CONVS):
            names.append(name)
            inside.append(name)
    return names


@register("ssf", category="parameter",
          description="SSF: learned scale and shift after every op with a bias and every norm layer; mergeable")
class SSF(ModuleTuner):
    Config = SSFConfig
    default_optimizer = "adamw"  # docs/defaults.md: measured against the lr grid
    default_lrs = {"adamw": 0.05}  # base lr (× batch/256)
    # CNNs (the generic view): 0.05 reached 0.54 of the best on MobileNetV2, 0.02 0.79 on its clevr-count; 0.01
    # passes every CNN cell measured (docs/defaults.md)
    default_lrs_by_family = {"generic": {"adamw": 0.01}}
    mergeable = True

    def attach(self):
        backbone, model = self.backbone, self.backbone.model
        names = ssf_ops(model)
        # only ops the forward calls as modules (an attention may read a weight directly, around the wrapper)
        called, overwritten = _call_survey(backbone, [model.get_submodule(n) for n in names])
        ops = [(n, o) for n, c, o in zip(names, called, overwritten) if c]
        if not ops:
            raise VistuneError(f"backbone {backbone.spec.name!r} has no op with a bias or norm layer for SSF",
                               "use another method (e.g. lora)")
        for name, output_overwritten in ops:
            replace_module(model, name, ScaleShift(model.get_submodule(name), self.config.init, output_overwritten))
