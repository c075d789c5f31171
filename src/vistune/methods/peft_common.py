"""Shared glue for the weight-space methods that run on HF peft (LoRA, DoRA, IA3, LN-tuning, VeRA, OFT, BOFT,
FourierFT).

peft injects its layers into the *copy* of the timm model that ``adapt()`` hands the method, so
the caller's backbone is never touched; every frozen tensor stays shared with it.

Fused qkv. timm ViT/Swin attention computes q, k and v with one ``qkv`` Linear, while the papers
adapt W_q and W_v only. When a target names q, k or v, the fused Linear is wrapped in a
:class:`SplitQKV` whose ``q``/``k``/``v`` children are :class:`FusedSlice` Linears that *view*
rows of the frozen fused weight (no copy, nothing extra in the state_dict); peft then targets
``…qkv.q`` and ``…qkv.v`` like any Linear, so only the Q and V output rows ever change. Merging
folds the three back into one plain Linear (see :mod:`vistune.merge`).

The forward still runs **one** frozen fused GEMM: :class:`SplitQKV` computes the fused output once and
hands each peft layer its rows as the output of its base layer (``FusedSlice.forward`` returns them
for that very input), so peft's own layer adds its update (LoRA's B·A x, DoRA's magnitude, IA3's
scaling) to rows it did not recompute. Three GEMMs over the row slices computed the same values with
three outputs and a copy more per block.

Targets are readable presets joined by ``+`` (e.g. ``qv+mlp``):
  transformer views (ViT, EVA, BEiT, Swin V1/V2)
            q, k, v, qv, kv, qkv, proj, attn (= qkv+proj), fc1 (every Linear of the MLP but fc2: SwiGLU's
            two), fc2, mlp (= fc1+fc2), all-linear (every Linear: attn + mlp, Swin's patch-merging reductions)
  every other timm model (the generic view)
            conv (every dense Conv2d, i.e. groups = 1), pointwise (1x1 dense Conv2d),
            linear (every Linear, e.g. ConvNeXt's MLPs, MetaFormer/MaxViT attention), dense (= conv+linear)
Depthwise convs are never targeted: peft's LoRA cannot merge grouped convs. Only modules the forward calls
as modules are targeted: some attentions (EVA-02, BEiT, Swin V2 with their separate q/v biases) read the
qkv weight directly (``F.linear``), where a peft layer would never run; there ``auto`` falls back to the
method's ``fallback_targets`` and explicit q/k/v targets are refused.
"""
from __future__ import annotations

import abc
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import replace_module
from ..errors import VistuneError
from .base import Borrowed, Foldable, MethodConfig, ModuleTuner, option

ADAPTER_NAME = "default"  # peft's adapter name; one adapter per vistune model
QKV = ("q", "k", "v")
TRANSFORMER_PRESETS = {
    "q": {"q"}, "k": {"k"}, "v": {"v"}, "qv": {"q", "v"}, "kv": {"k", "v"}, "qkv": set(QKV),
    "proj": {"proj"}, "attn": {*QKV, "proj"}, "fc1": {"fc1"}, "fc2": {"fc2"}, "mlp": {"fc1", "fc2"},
    "all-linear": {*QKV, "proj", "fc1", "fc2", "other-linear"},
}
CNN_PRESETS = {"conv": {"conv"}, "pointwise": {"pointwise"}, "linear": {"linear"}, "dense": {"conv", "linear"}}


def require_peft():
    """Import peft (a dependency of vistune, imported lazily: it pulls in transformers)."""
    try:
        import peft
    except ImportError:
        raise VistuneError("the LoRA/DoRA/IA3/LN-tuning methods need the peft package",
                           "pip install 'peft>=0.13,<1'") from None
    return peft


class FusedSlice(nn.Linear, Foldable):
    """Rows [start, stop) of a frozen fused Linear, as a Linear of its own.

    Its weight and bias are views read from the fused Linear on every access, so they follow the
    fused one through ``.to()``, cost no memory and add no state_dict entries."""

    def __init__(self, fused: nn.Linear, start: int, stop: int):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no parameters of its own
        self.in_features, self.out_features = fused.in_features, stop - start
        self._fused = Borrowed(fused)  # SplitQKV owns it
        self._rows = slice(start, stop)
        self._computed: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, these rows of its fused output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """These rows of the fused output when SplitQKV has just computed it for this very ``x``; else the GEMM
        (e.g. IA3's feed-forward form scales the input before the base layer sees it)."""
        if self._computed is not None and self._computed[0] is x:
            return self._computed[1]
        return super().forward(x)

    @property
    def weight(self) -> torch.Tensor:
        return self._fused.value.weight[self._rows]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self._fused.value.bias
        return None if bias is None else bias[self._rows]

    def merged(self) -> nn.Linear:
        """A plain Linear holding a copy of these rows (merging writes into it, never the fused weight)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight)
            if plain.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.requires_grad_(False)


class SplitQKV(nn.Module, Foldable):
    """A fused qkv Linear seen as three Linears ``q``, ``k``, ``v``; output = cat(q(x), k(x), v(x))."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise VistuneError(f"a qkv Linear with {fused.out_features} outputs cannot be split in three")
        d = fused.out_features // 3
        self.fused = fused  # the stock module: its tensors stay frozen backbone tensors
        self.q, self.k, self.v = (FusedSlice(fused, i * d, (i + 1) * d) for i in range(3))
        self._slices = Borrowed((self.q, self.k, self.v))  # still reachable once peft wraps q/k/v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cat(q(x), k(x), v(x)) from one fused GEMM: each child that peft wraps gets its rows as its base output."""
        rows = self.fused(x).split(self.fused.out_features // 3, dim=-1)
        outputs = []
        for child, base, part in zip((self.q, self.k, self.v), self._slices.value, rows):
            if child is base:  # not adapted: the fused rows themselves
                outputs.append(part)
                continue
            base._computed = (x, part)
            try:
                outputs.append(child(x))
            finally:
                base._computed = None
        return torch.cat(outputs, dim=-1)

    def merged(self) -> nn.Linear:
        """One plain Linear again (called once q/k/v hold plain, merged Linears)."""
        parts = [self.q, self.k, self.v]
        plain = nn.Linear(self.fused.in_features, self.fused.out_features, bias=self.fused.bias is not None,
                          device=self.fused.weight.device, dtype=self.fused.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(torch.cat([p.weight for p in parts]))
            if plain.bias is not None:
                plain.bias.copy_(torch.cat([p.bias for p in parts]))
        return plain.requires_grad_(False)


def parse_targets(spec: str, family: str, transformer: bool) -> set[str]:
    """'qv+mlp' → the roles it names, checked against the presets of the view (transformer or generic)."""
    presets = TRANSFORMER_PRESETS if transformer else CNN_PRESETS
    roles: set[str] = set()
    for atom in spec.split("+"):
        atom = atom.strip()
        if atom not in presets:
            other = CNN_PRESETS if transformer else TRANSFORMER_PRESETS
            why = (f" ({atom!r} is a preset of the {'generic view' if transformer else 'transformer views'}, "
                   "the other families)") if atom in other else ""
            raise VistuneError(f"targets={spec!r}: {atom!r} is not a target preset for the {family} family{why}",
                               f"use one of {', '.join(presets)}, joined by '+' (e.g. "
                               f"{'qv+mlp' if transformer else 'conv+linear'})")
        roles |= presets[atom]
    return roles


def _attention_projections(attn: nn.Module) -> dict[str, nn.Module] | None:
    """q/k/v Linears an attention has of its own (EVA's unfused q_proj/k_proj/v_proj), else None."""
    parts = {r: getattr(attn, f"{r}_proj", None) for r in QKV}
    return parts if all(isinstance(m, nn.Linear) for m in parts.values()) else None


def qkv_runs_as_module(backbone) -> bool:
    """Do the blocks' attentions call their q/k/v projections as modules (so a peft layer on them runs)?"""
    projections = []
    for block in backbone.blocks():
        own = _attention_projections(block.attn)
        projections += list(own.values()) if own else [getattr(block.attn, "qkv", None)]
    return all(isinstance(m, nn.Linear) for m in projections) and all(backbone.called(projections))


def resolve_targets(backbone, spec: str) -> dict[str, str]:
    """Module names to adapt in ``backbone.model`` → their role; splits fused qkv Linears when needed.

    Called on the method's copy of the backbone (it may wrap modules in place)."""
    roles = parse_targets(spec, backbone.family, backbone.transformer)
    model = backbone.model
    found: dict[str, str] = {}
    if not backbone.transformer:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                if "conv" in roles or ("pointwise" in roles and m.kernel_size == (1, 1)):
                    found[name] = "pointwise" if m.kernel_size == (1, 1) else "conv"
            elif isinstance(m, nn.Linear) and "linear" in roles:
                found[name] = "linear"
        modules = [model.get_submodule(n) for n in found]
        found = {n: role for (n, role), called in zip(found.items(), backbone.called(modules)) if called}
    else:
        wanted = [r for r in QKV if r in roles]
        if wanted and not qkv_runs_as_module(backbone):
            raise VistuneError(
                f"targets={spec!r}: the attention of {backbone.spec.name!r} ({type(backbone.blocks()[0].attn).__name__}) "
                "computes q/k/v from its qkv weight directly (F.linear with separate q/v biases), so a peft layer on "
                "W_q/W_k/W_v would never run", "target proj and the MLP instead, e.g. --set targets=proj+mlp")
        covered: set[int] = set()
        for block in backbone.blocks():
            attn, mlp = block.attn, block.mlp
            fc1 = [m for n, m in mlp.named_children() if isinstance(m, nn.Linear) and n != "fc2"]
            own = _attention_projections(attn)
            covered |= {id(m) for m in (*(own or {"qkv": attn.qkv}).values(), attn.proj, *fc1, mlp.fc2)}
            if wanted and own:
                found.update({backbone.module_names([own[r]])[0]: r for r in wanted})
            elif wanted:
                qkv_name = backbone.module_names([attn.qkv])[0]
                replace_module(model, qkv_name, SplitQKV(attn.qkv))
                found.update({f"{qkv_name}.{r}": r for r in wanted})
            for role, modules in (("proj", [attn.proj]), ("fc1", fc1), ("fc2", [mlp.fc2])):
                if role in roles:
                    found.update({name: role for name in backbone.module_names(modules)})
        if "other-linear" in roles:
            for name, m in model.named_modules():
                if isinstance(m, nn.Linear) and not isinstance(m, FusedSlice) and id(m) not in covered:
                    found[name] = "other-linear"
    if not found:
        raise VistuneError(f"targets={spec!r} matches no module of backbone {backbone.spec.name!r}",
                           "choose another preset (see `vistune methods --details`)")
    return found


def expose_base_attributes(model: nn.Module) -> None:
    """Give each peft layer the plain settings of the layer it wraps (kernel_size, stride, in_features, ...):
    some timm modules read them around the call (DaViT's ``conv.kernel_size``), and peft's layers lack them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer()
            for key, value in vars(base).items():
                if (not key.startswith("_") and isinstance(value, (bool, int, float, str, tuple))
                        and not hasattr(layer, key)):
                    setattr(layer, key, value)


def exact_names(names) -> str:
    """A peft ``target_modules`` pattern matching exactly these module names (peft reads a list as
    name *suffixes*: "norm" would also match "patch_embed.norm"; a string is a full-match regex)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


@dataclass
class PeftMethodConfig(MethodConfig):
    targets: str = option("auto", "modules to adapt: presets joined by '+' (transformers: q k v qv kv qkv proj attn "
                                  "fc1 fc2 mlp all-linear; any other timm model: conv pointwise linear dense); "
                                  "auto = the method's")


class PeftMethod(ModuleTuner, abc.ABC):
    """A frozen backbone with peft layers injected into the method's copy, and a linear head."""

    Config = PeftMethodConfig
    mergeable = True  # peft merges its layers; the split qkv folds back (Foldable)
    default_targets = {"transformer": "qv", "generic": "dense"}
    fallback_targets = "mlp"  # transformer views whose attention reads the qkv weight directly (no q/k/v layer)
    linear_only = False  # True: the method's peft layers take nn.Linear only (conv targets are refused)
    flat_inputs_only = False  # True: its peft Linear layers read a 4-D input as a conv map (peft 0.21's OFT)

    def attach(self):
        self.targets = self.select_targets(self.backbone, self.config)
        with warnings.catch_warnings():
            # peft cannot read in/out features off a norm layer (LN-tuning) and warns; nothing is wrong
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            require_peft().inject_adapter_in_model(self.peft_config(self.targets), self.backbone.model, ADAPTER_NAME)
        expose_base_attributes(self.backbone.model)

    def select_targets(self, backbone, config) -> dict[str, str]:
        """Module name → role of every module peft adapts."""
        spec = config.targets
        if spec == "auto":
            spec = self.default_targets["transformer" if backbone.transformer else "generic"]
            if backbone.transformer and not qkv_runs_as_module(backbone):
                spec = self.fallback_targets
        try:
            targets = resolve_targets(backbone, spec)
        except VistuneError as e:
            if not (self.linear_only and spec == "linear"):
                raise
            raise VistuneError(f"{self.info.name}: {e.what}: this method's peft layers take nn.Linear only, and the "
                               "forward of this model calls none", "use lora, ia3 or ssf on this backbone") from None
        convs = sorted(n for n, role in targets.items() if role in ("conv", "pointwise"))
        if self.linear_only and convs:
            raise VistuneError(f"{self.info.name}: targets={spec!r} include convolutions ({convs[0]}, ...), but this "
                               "method's peft layers (or their merge) hold only for nn.Linear",
                               "use --set targets=linear (every Linear of the model)")
        if self.flat_inputs_only:
            targets = self._drop_four_d_inputs(backbone, targets, spec, explicit=config.targets != "auto")
        return targets

    def _drop_four_d_inputs(self, backbone, targets: dict[str, str], spec: str, explicit: bool) -> dict[str, str]:
        """Without the Linears that read (B, H, W, C) or other 4-D inputs; an explicit spec naming one is refused."""
        names = list(targets)
        ndims = backbone.input_ndims([backbone.model.get_submodule(n) for n in names])
        four_d = [n for n, d in zip(names, ndims) if d == 4]
        if four_d and explicit:
            raise VistuneError(f"{self.info.name}: targets={spec!r} include Linears that read 4-D inputs "
                               f"({four_d[0]}, ...), which peft's {self.info.name} layer treats as conv maps",
                               "target Linears on token sequences (e.g. --set targets=qv), or use lora")
        kept = {n: r for n, r in targets.items() if n not in four_d}
        if not kept:
            raise VistuneError(f"{self.info.name}: every Linear of {backbone.spec.name!r} reads a 4-D (channels-last) "
                               f"input, which peft's {self.info.name} layer treats as a conv map",
                               "use lora, ia3 or ssf on this backbone")
        return kept

    @abc.abstractmethod
    def peft_config(self, targets: dict[str, str]):
        """The peft config that adapts exactly ``targets``."""

