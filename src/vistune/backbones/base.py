"""The view: one small interface over a stock timm model.

:class:`BackboneView` itself is the **generic view** of every timm model, built only on the public interfaces
all of timm's models implement (``forward_features``, ``forward_head(pre_logits=True)``, ``reset_classifier``,
``feature_info``, ``forward_intermediates``, ``pretrained_cfg``): its stages are the feature levels timm names,
its blocks the residual blocks inside them. Family views (``vit``, ``eva``, ``beit``, ``swin``, ``swinv2``)
subclass it only where a method needs the token sequence or the window attention.

Methods reach the backbone only through this interface (token tuners) or by wrapping its
modules (module tuners); no timm model file is ever forked.
"""
from __future__ import annotations

import copy
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import VistuneError


@dataclass
class BackboneSpec:
    """Where a backbone came from; recorded in every artifact so it can be rebuilt exactly."""

    name: str  # the name the user gave: a timm architecture or an offline/packaged name
    architecture: str  # the timm architecture that is instantiated
    source: str  # "hub", "file", "random-init", "package:<dist>", "vistune:<file>"
    checkpoint: str | None = None  # local weights file, when source == "file"
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (tests)

    def to_dict(self) -> dict:
        return asdict(self)


class ForwardsAttributes:
    """For a module wrapping ``self.inner``: an attribute it lacks is read from ``inner``. timm modules read
    attributes of the op they call around the call (``kernel_size``, Swin's ``attn.window_size``, the weight's
    device), and a wrapper in the op's place must answer them as the op would."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class Borrowed:
    """A reference to a module or tensor that another module owns (and saves).

    An attribute holding a module registers it as a child; wrapping it in ``Borrowed`` does not, so a module
    shared between a method and the wrappers it puts into the backbone appears once in ``state_dict()`` and
    ``parameters()`` (under the method), and ``.to()`` moves it once."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@dataclass(frozen=True)
class Layout:
    """How a module's output tensor holds its channels: ``nchw`` feature maps, ``nhwc`` feature maps (Swin,
    MambaOut, VOLO) or a ``tokens`` sequence (B, N, C) whose spatial order the generic view does not know."""

    kind: Literal["nchw", "nhwc", "tokens"]
    channels: int

    @property
    def channel_dim(self) -> int:
        return 1 if self.kind == "nchw" else -1


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted, as in ``named_modules``) of ``root`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)


# the seam of the transformer views (``transformer = True``): blocks() are attention + MLP blocks on a residual
# stream, each with ``attn`` (its output projection ``attn.proj``) and ``mlp`` (its last Linear ``mlp.fc2``)
ATTENTION_BLOCKS = "attention-blocks"


class BackboneView(nn.Module):
    """A frozen timm model seen through the interface every method uses: the generic view of any timm model.

    Family views subclass it, set ``family`` and the ``seams`` they offer token tuners (``"tokens"``: the token
    sequence, ``forward_tokens``; ``"window-prompts"``: extra keys/values in window attention) and module tuners
    (``"attn-mlp"``: ``blocks()`` are transformer blocks with ``attn`` and ``mlp`` sub-layers), and set
    ``transformer`` when their ``blocks()`` are pre-norm transformer blocks (``attn`` + ``mlp``), where module
    tuners keep their transformer placements (adapter after the FFN, LoRA on W_q/W_v, ...). Such views also offer
    the seam ``"attention-blocks"`` (:data:`ATTENTION_BLOCKS`): module tuners defined on the weight matrices or the
    residual branches of transformer blocks (FacT, DiffFit) need it, so they are refused on every other view.
    """

    family: ClassVar[str] = "generic"
    seams: ClassVar[frozenset[str]] = frozenset()
    transformer: ClassVar[bool] = False

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self._fingerprint: str | None = None
        self._num_params = sum(p.numel() for p in model.parameters())
        # identities of the stock model's modules, and of those whose tensors a method tunes: a
        # tensor is frozen iff a stock module owns it and it is not tuned (module identity, unlike
        # a buffer tensor's, survives .to(device); modules a method wraps in are never stock)
        self.stock_module_ids: frozenset[int] = frozenset(id(m) for m in model.modules())
        self.tuned_module_ids: frozenset[int] = frozenset()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # ---- the interface -------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature the head reads."""
        return getattr(self.model, "head_hidden_size", None) or self.model.num_features

    @property
    def timm_family(self) -> str:
        """timm's module of the model class (``efficientnet``, ``regnet``, ``eva``, ...)."""
        return type(self.model).__module__.rpartition(".")[2]

    def _feature_levels(self) -> list[tuple[str, int]]:
        """(module name, reduction) of each feature level timm's ``feature_info`` names that is a real module."""
        levels = []
        for entry in getattr(self.model, "feature_info", None) or []:
            name = entry.get("module") if isinstance(entry, dict) else None
            if not name:
                continue
            try:
                self.model.get_submodule(name)
            except AttributeError:  # some models name levels that are not modules (MViTv2, Twins)
                continue
            levels.append((name, int(entry.get("reduction", 0))))
        return levels

    def stage_names(self) -> list[str]:
        """Names of the stages: the children of the container that holds timm's feature levels (every child,
        also those between two levels, e.g. all 7 block stages of an EfficientNet), or, when the levels are
        direct children of the model (ResNet, RegNet), those levels minus the stem (reduction ≤ 2)."""
        levels = self._feature_levels()
        if not levels:
            raise VistuneError(
                f"backbone {self.spec.name!r} ({type(self.model).__name__}) names no feature levels that are modules "
                "in timm's feature_info, so vistune cannot find its stages and blocks",
                "use a method that needs neither (linear, mlp, bias, ln-tuning, lora, ssf, full, vpt-pad, sidetune)",
            )
        parents = Counter(name.rpartition(".")[0] for name, _ in levels)
        top = max(parents.values())
        parent = [n.rpartition(".")[0] for n, _ in levels if parents[n.rpartition(".")[0]] == top][-1]
        if parent:
            container = self.model.get_submodule(parent)
            if isinstance(container, (nn.Sequential, nn.ModuleList)):
                return [f"{parent}.{c}" for c, m in container.named_children() if _has_params(m)]
        names = [n for n, _ in levels if n.rpartition(".")[0] == parent and _has_params(self.model.get_submodule(n))]
        past_stem = [n for n, r in levels if n in names and r > 2]
        return past_stem or names

    def stages(self) -> list[nn.Module]:
        """The stages in forward order (see :meth:`stage_names`)."""
        return [self.model.get_submodule(n) for n in self.stage_names()]

    def blocks(self) -> list[nn.Module]:
        """The residual blocks in forward order, flattened across stages: a stage's children when it is a
        Sequential/ModuleList, else its ``blocks`` list, else its children when they are ≥ 2 of one type (RegNet's
        ``b1, b2, …``), else the stage itself (a plain sequence of blocks: ViT-like models, Hiera)."""
        out = []
        for stage in self.stages():
            inner = stage if isinstance(stage, (nn.Sequential, nn.ModuleList)) else getattr(stage, "blocks", None)
            if not isinstance(inner, (nn.Sequential, nn.ModuleList)):
                children = [c for c in stage.children() if _has_params(c)]
                inner = children if len(children) >= 2 and len({type(c) for c in children}) == 1 else [stage]
            out.extend(c for c in inner if _has_params(c))
        return out

    def final_modules(self) -> dict[str, nn.Module]:
        """Modules with parameters after the last stage and before the classifier (final norms, head convs,
        ConvNeXt's head norm), in the model's own order of children."""
        last = self.stage_names()[-1].split(".")[0]
        names = [n for n, _ in self.model.named_children()]
        after = names[names.index(last) + 1:]
        return {n: self.model.get_submodule(n) for n in after if _has_params(self.model.get_submodule(n))}

    def input_size(self) -> tuple[int, int]:
        """The image size the model is built for: its ``img_size`` option, its patch embedding's, the pretrained
        config's when the model needs a fixed size, else 64 px (enough for one cheap dummy pass)."""
        size = self.spec.model_kwargs.get("img_size") or getattr(getattr(self.model, "patch_embed", None),
                                                                 "img_size", None)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if size is None and cfg.get("fixed_input_size") and cfg.get("input_size"):
            size = tuple(cfg["input_size"][-2:])
        if size is None:
            return (64, 64)
        return (size, size) if isinstance(size, int) else tuple(size)

    def called(self, modules: list[nn.Module]) -> list[bool]:
        """Which of ``modules`` the model's forward calls as modules (one dummy pass). Some attentions read a
        Linear's weight directly (``F.linear(x, qkv.weight, q/v bias)``): wrapping such a Linear changes nothing."""
        seen: set[int] = set()
        self.dummy_forward([m.register_forward_pre_hook(lambda mod, args: seen.add(id(mod))) for m in modules])
        return [id(m) in seen for m in modules]

    def input_ndims(self, modules: list[nn.Module]) -> list[int | None]:
        """The number of dims of each module's first input in one dummy pass (None: not called as a module)."""
        ndims: dict[int, int] = {}

        def record(mod, args) -> None:
            if args and isinstance(args[0], torch.Tensor):
                ndims.setdefault(id(mod), args[0].ndim)

        self.dummy_forward([m.register_forward_pre_hook(record) for m in modules])
        return [ndims.get(id(m)) for m in modules]

    def dummy_forward(self, hooks: list) -> None:
        """One ``forward_features`` pass of a zero image at the model's input size; removes ``hooks`` after."""
        try:
            with torch.no_grad():
                p = next(self.model.parameters())
                self.model.forward_features(torch.zeros(1, 3, *self.input_size(), device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()

    def layouts(self, modules: list[nn.Module]) -> list[Layout | None]:
        """The layout of each module's output, read off one dummy forward pass (None: not a single 3-D/4-D tensor,
        e.g. PiT's (tokens, cls) tuples). A 4-D output is NHWC when its dims 1 and 2 match and dim 3 differs
        (square input), NCHW otherwise, unless the model says ``output_fmt = 'NHWC'``."""
        outputs: dict[int, object] = {}

        def record(module, inputs, output) -> None:
            outputs.setdefault(id(module), output)

        self.dummy_forward([m.register_forward_hook(record) for m in modules])
        nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        result: list[Layout | None] = []
        for m in modules:
            out = outputs.get(id(m))
            if not torch.is_tensor(out) or out.ndim not in (3, 4):
                result.append(None)
            elif out.ndim == 3:
                result.append(Layout("tokens", out.shape[-1]))
            elif out.shape[1] == out.shape[2] != out.shape[3] or (nhwc and out.shape[1] == out.shape[2]):
                result.append(Layout("nhwc", out.shape[-1]))
            else:
                result.append(Layout("nchw", out.shape[1]))
        return result

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch → pooled pre-logit feature (B, feature_dim)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # ---- bookkeeping ----------------------------------------------------------------------
    def train(self, mode: bool = True):
        # The frozen backbone always runs in eval mode (dropout, drop-path, BN statistics off);
        # methods that train parts of it switch those parts on themselves.
        return super().train(False)

    def module_names(self, modules) -> list[str]:
        by_id = {id(m): n for n, m in self.model.named_modules()}
        return [by_id[id(m)] for m in modules]

    def num_params(self) -> int:
        """Parameters of the stock backbone (not counting modules a method wraps into it)."""
        return self._num_params

    def fingerprint(self) -> str:
        """sha256 over parameter and buffer names and bytes of the untouched backbone."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def clone_for_tuning(self, tuned: set[str]) -> "BackboneView":
        """A new view whose module tree is a copy, sharing every frozen tensor with this one.

        Parameters named in ``tuned`` (and buffers of modules that own a tuned parameter) are
        cloned and made trainable, so training never touches this view's tensors: the original
        backbone stays bit-identical while memory for frozen weights is not duplicated.
        """
        fingerprint = self.fingerprint()
        unknown = tuned - {n for n, _ in self.model.named_parameters()}
        if unknown:
            raise KeyError(f"not backbone parameters: {sorted(unknown)[:5]}")
        tuned_modules = {n.rpartition(".")[0] for n in tuned}
        memo: dict[int, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if name not in tuned:
                # a new Parameter object over the same storage: no copy, yet .to(device) on the clone
                # (which swaps a Parameter's .data in place) can never move this view's weights
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        for name, b in self.model.named_buffers():
            if name.rpartition(".")[0] not in tuned_modules:
                memo[id(b)] = b
        model = copy.deepcopy(self.model, memo)
        view = type(self).__new__(type(self))
        nn.Module.__init__(view)
        view.model = model
        view.spec = self.spec
        view._fingerprint = fingerprint
        view._num_params = self._num_params
        view.stock_module_ids = frozenset(id(m) for m in model.modules())
        view.tuned_module_ids = frozenset(id(m) for n, m in model.named_modules() if n in tuned_modules)
        for name, p in model.named_parameters():
            p.requires_grad_(name in tuned)
        model.eval()
        return view
