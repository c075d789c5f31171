"""What every method shares: the typed config, the adapted-model base class, the registry.

A method is one file: a ``@dataclass`` config whose fields carry help text, and a subclass of
:class:`Method` registered with :func:`register`. ``adapt()`` builds it over a *copy* of the
backbone view that shares every frozen tensor, so the caller's backbone is never modified.
"""
from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from ..backbones import FAMILIES, SEAMS, VIEWS, BackboneView, Borrowed  # noqa: F401 (Borrowed: re-exported)
from ..errors import VistuneError, suggest

CATEGORIES = ("fine-tuning", "prompt", "adapter", "parameter", "remapping")


def option(default, help: str, **kwargs):
    """A config field with help text (shown by `vistune methods --details` and `--set` errors)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Base of every method's config: fields made with :func:`option`, checked in :meth:`validate`.

    ``method`` links a config to its registered method (as PEFT's ``peft_type``): several methods may share one
    config class (vpt-shallow and vpt-deep, lora and dora), so the type alone does not say which method it
    configures. It is keyword-only, not an option, and not part of :meth:`to_dict`. A config is validated once,
    when it is built (``__post_init__``), so an invalid config never exists."""

    method: str | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise VistuneError for out-of-range values; subclasses extend."""

    def to_dict(self) -> dict:
        """The options (what an artifact stores and ``make_config`` takes back)."""
        return {f.name: getattr(self, f.name) for f in option_fields(type(self))}

    @classmethod
    def fields_help(cls) -> dict[str, tuple[str, object, str]]:
        hints = typing.get_type_hints(cls)
        return {f.name: (_type_name(hints[f.name]), _default(f), f.metadata.get("help", ""))
                for f in option_fields(cls)}

    @classmethod
    def from_overrides(cls, overrides: dict[str, object], method: str) -> "MethodConfig":
        """Build (and so validate) from ``--set key=value`` strings (or already-typed values)."""
        valid = {f.name: f for f in option_fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in overrides.items():
            if key not in valid:
                raise VistuneError(
                    f"method {method!r} has no option {key!r}.{suggest(key, valid)}",
                    f"valid keys: {', '.join(valid) or '(none)'}",
                )
            kwargs[key] = _coerce(value, hints[key], f"{method}.{key}")
        return cls(method=method, **kwargs)


def check_at_most(method: str, name: str, value: int, limit: int, why: str, typical: int) -> None:
    """Refuse an option that sizes tensors beyond ``limit`` before anything is allocated (an absurd value would
    otherwise fail in the allocator, or take the machine's memory)."""
    if value > limit:
        raise VistuneError(f"{method}: {name}={value} is above the limit of {limit} ({why})",
                           f"use --set {name}={typical} (at most {limit})")


def option_fields(cls: type[MethodConfig]) -> list[dataclasses.Field]:
    """A config's options: every dataclass field but the ``method`` link."""
    return [f for f in dataclasses.fields(cls) if f.name != "method"]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _type_name(args[0]) + "?"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if value not in [str(a) for a in args]:
            raise VistuneError(f"{where}={value!r} is not one of {list(args)}", f"use one of {list(args)}")
        return next(a for a in args if str(a) == value)
    if type(None) in args:
        if value.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
    except ValueError:
        raise VistuneError(f"{where}={value!r} is not a valid {tp.__name__}", None) from None
    raise VistuneError(f"{where}: cannot parse {value!r} as {tp}")



class Foldable(abc.ABC):
    """A module vistune wraps into a backbone that knows its merged form (for :mod:`vistune.merge`)."""

    @abc.abstractmethod
    def merged(self) -> nn.Module:
        """A stock torch/timm module computing the same function (a copy: the frozen tensors are not touched)."""


class Method(nn.Module):
    """An adapted model: a frozen backbone view, the method's few parameters, and a head.

    **The contract.** A method is a subclass registered with :func:`register`. It declares, as class attributes:

    ``Config``
        its :class:`MethodConfig` subclass (default: no options).
    ``default_optimizer``
        ``"sgd"`` (VPT's recipe: momentum 0.9) or ``"adamw"``; ``--optimizer`` overrides it.
    ``default_lrs``
        base learning rate per optimizer (before the trainer's ``× batch/256``); optimizers it leaves out use the
        trainer's default for that optimizer. ``benchmarks/defaults.py`` measures a method's default against the
        lr grid (docs/defaults.md): a new method's defaults must pass it.
    ``default_lrs_by_family``
        base learning rates that replace ``default_lrs`` on one backbone family (a view's ``family``: ``vit``,
        ``swin``, ``generic`` — the CNNs —, …), where the measurement shows that one lr does not suit both, e.g.
        ``{"generic": {"adamw": 0.02}}``. :meth:`default_lr_for` resolves the two.
    ``default_warmup_fraction``
        warm-up length as a fraction of the run, when ``--warmup-epochs`` is not given: whole epochs, or that
        fraction of the steps in a run too short for one whole warm-up epoch.
    ``head_only``
        True when nothing but the head trains and the head reads the pooled frozen feature (linear, mlp): the
        trainer may then compute the frozen features once (the feature cache).
    ``supports_segmentation``
        may ``adapt(..., task="segmentation")`` put an FPN decoder over this method's backbone? (methods that
        add tokens, pad the input, calibrate on image labels or train on pooled features say no).
    ``mergeable``
        can :func:`vistune.merge.merge` fold it into a plain timm model (its change lives in the backbone's
        weights; every wrapper it adds is :class:`Foldable` or a peft layer)?
    ``deployable``
        does it have an input-only deploy mode (``model.deploy = True``; PGN's prompts as pixels)?

    and implements :meth:`attach` (build its parameters, wrap modules of ``self.backbone`` — the method's own
    copy of the module tree, which shares every frozen tensor with the caller's backbone). It may override
    :meth:`build_head` (default: a linear head on the pooled feature), :meth:`features` (default: the backbone's
    own pooled feature), :meth:`tuned_backbone_parameters`, :meth:`backbone_train_modules`, :meth:`prepare` and
    :meth:`artifact_config`.
    Two kinds of method change the backbone, and say so by subclassing :class:`ModuleTuner` or
    :class:`TokenTuner` (a method may be both where a family demands it). Every tensor that is not a shared
    frozen backbone tensor is saved in the artifact automatically.
    """

    info: ClassVar["MethodInfo"]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    default_optimizer: ClassVar[Literal["sgd", "adamw"]] = "sgd"
    default_lrs: ClassVar[Mapping[str, float]] = {}
    default_lrs_by_family: ClassVar[Mapping[str, Mapping[str, float]]] = {}
    default_warmup_fraction: ClassVar[float] = 0.1  # VPT: 10 of 100 epochs
    head_only: ClassVar[bool] = False
    supports_segmentation: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    deployable: ClassVar[bool] = False
    task: str = "classification"  # set by adapt(); "segmentation": head = FPN decoder, logits (B, K, H, W)

    def __init__(self, backbone: BackboneView, config: MethodConfig, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes
        self.attach()
        self.head = self.build_head()  # after attach(): its parameters are drawn from the RNG last

    @classmethod
    def default_lr_for(cls, optimizer: str, family: str | None) -> float | None:
        """The method's own base lr for ``optimizer`` on a backbone of ``family`` (None: the method has none and
        the trainer's default for the optimizer applies)."""
        own = cls.default_lrs_by_family.get(family, {}) if family is not None else {}
        return own.get(optimizer, cls.default_lrs.get(optimizer))

    # ---- what subclasses implement / may override ------------------------------------------
    def attach(self) -> None:
        """Build the method's parameters and put its modules into ``self.backbone`` (default: nothing)."""

    def build_head(self) -> nn.Module:
        """The classification head (default: linear on the pooled feature, trunc-normal 0.01, zero bias)."""
        return self.make_linear_head()

    @classmethod
    def tuned_backbone_parameters(cls, backbone: BackboneView, config) -> set[str]:
        """Names of backbone parameters this method trains (cloned before training)."""
        return set()

    @classmethod
    def artifact_config(cls, config: dict, tensor_shapes: Mapping[str, Sequence[int]]) -> dict:
        """The options that rebuild an artifact, from its stored ``config`` and its tensors' shapes. A method
        whose option changed meaning recognises an older artifact by its tensors here and returns the options
        that compute what it computed; default: the stored options."""
        return config

    def backbone_train_modules(self) -> list[nn.Module]:
        """Backbone modules that run in train mode while training (all others stay in eval)."""
        return []

    def prepare(self, train_set, *, device: torch.device, batch_size: int, progress: bool) -> None:
        """Data-dependent set-up before training (e.g. SCT's calibration pass); default: none.

        ``train_set`` yields un-augmented (image, label) pairs of the training split."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch → the pooled feature (B, feature_dim) the head reads."""
        return self.backbone.forward_features(x)

    def dense_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale NCHW feature maps (finest first) of the adapted backbone, for the segmentation decoder."""
        from .decoder import dense_features

        return dense_features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            return self.head(self.dense_features(x), x.shape[-2:])
        return self.head(self.features(x))

    # ---- shared behaviour -----------------------------------------------------------------
    @property
    def trains_head_only(self) -> bool:
        """True when only a head on the pooled frozen feature trains, so the frozen features can be cached."""
        return self.head_only and self.task == "classification"

    def make_linear_head(self, in_dim: int | None = None) -> nn.Linear:
        head = nn.Linear(in_dim or self.backbone.feature_dim, self.num_classes)
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        return head

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.model.eval()
        if mode:
            for m in self.backbone_train_modules():
                m.train()
        return self

    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a shared frozen backbone tensor: what an artifact stores."""
        frozen = self.frozen_keys()
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if k not in frozen}

    def frozen_keys(self) -> set[str]:
        """state_dict keys of the frozen backbone tensors: owned by a stock backbone module, not tuned."""
        view = self.backbone
        keys = set()
        for mod_name, mod in view.model.named_modules():
            if id(mod) not in view.stock_module_ids:
                continue
            prefix = f"backbone.model.{mod_name}." if mod_name else "backbone.model."
            keys.update(prefix + n for n, p in mod.named_parameters(recurse=False) if not p.requires_grad)
            if id(mod) not in view.tuned_module_ids:
                keys.update(prefix + n for n, _ in mod.named_buffers(recurse=False))
        return keys

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The frozen backbone tensors by name (for bit-identity checks)."""
        frozen = self.frozen_keys()
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if k in frozen}


class ModuleTuner(Method):
    """A method that changes the backbone's modules, in its own copy of the module tree.

    It tunes some of the backbone's own parameters (:meth:`tuned_backbone_parameters`; they are cloned first),
    and/or wraps or replaces backbone modules (adapters, peft layers, prompt blocks, scale-shift ops). The
    backbone's own forward runs over the changed modules, so every seam of the backbone — the pooled feature,
    timm's ``forward_intermediates`` for segmentation — sees the change, whatever the family."""


class TokenTuner(Method):
    """A method that adds tokens to the token sequence of a token family (ViT & kin: ViT, EVA, BEiT).

    It reaches the sequence only through the view's one seam, ``view.forward_tokens(x, prompts, layer_prompts)``
    (:class:`~vistune.backbones.vit.ViTView`): the prompts enter after the positional embedding, after all prefix
    tokens, before ``norm_pre``, and never reach the final norm or pooling. Such a model has no feature maps
    without its prompts and no merged form: token tuners neither segment nor merge. It registers with
    ``needs=("tokens", ...)``: the seams of a view it can run on (any one of them)."""

    token_seam: ClassVar[str] = "tokens"


class InputTuner(Method):
    """A method that changes only the input image (VPT's pad prompts): the frozen backbone runs unchanged on it."""


class SideTuner(Method):
    """A method that runs a trainable second network beside the frozen backbone and blends the two features."""


TUNER_KINDS = {"token": TokenTuner, "module": ModuleTuner, "input": InputTuner, "side": SideTuner}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    method_class: type[Method]
    category: str
    needs: tuple[str, ...]  # view seams it can run on, any one of them; () = every view (module tuners, heads, ...)
    description: str

    def supports(self, view: BackboneView | type[BackboneView]) -> bool:
        """Does a view (or view class) offer what the method needs?"""
        return not self.needs or bool(set(self.needs) & view.seams)

    @property
    def families(self) -> tuple[str, ...]:
        """The views it runs on (generated from :attr:`needs` and the views' seams): ``("any",)`` when it needs
        nothing of the backbone but timm's own interfaces."""
        return ("any",) if not self.needs else tuple(v.family for v in VIEWS if self.supports(v))

    @property
    def config_class(self) -> type[MethodConfig]:
        return self.method_class.Config

    @property
    def kinds(self) -> tuple[str, ...]:
        """How the method changes the frozen model: "head" (only a head trains), or the :data:`TUNER_KINDS` it
        subclasses — "token", "module" (both for VPT: tokens on ViT, modules on Swin), "input", "side"."""
        cls = self.method_class
        return ("head",) if cls.head_only else tuple(k for k, base in TUNER_KINDS.items() if issubclass(cls, base))


METHODS: dict[str, MethodInfo] = {}


def _check_contract(name: str, cls: type[Method], needs: tuple[str, ...]) -> None:
    """The class attributes of the contract (see :class:`Method`) are well-formed; a programming error if not."""
    problems = []
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, MethodConfig)):
        problems.append("Config must be a MethodConfig subclass")
    if cls.default_optimizer not in ("sgd", "adamw"):
        problems.append(f"default_optimizer {cls.default_optimizer!r} is not sgd or adamw")
    unknown = set(cls.default_lrs_by_family) - set(FAMILIES)  # a misspelt family would never apply
    if unknown:
        problems.append(f"default_lrs_by_family has families {sorted(unknown)} that no view has "
                        f"({', '.join(FAMILIES)})")
    lr_tables = {"default_lrs": cls.default_lrs,
                 **{f"default_lrs_by_family[{f!r}]": lrs for f, lrs in cls.default_lrs_by_family.items()}}
    for where, lrs in lr_tables.items():
        if set(lrs) - {"sgd", "adamw"} or any(v <= 0 for v in lrs.values()):
            problems.append(f"{where} {dict(lrs)} must map sgd/adamw to positive lrs")
    if not 0 <= cls.default_warmup_fraction < 1:
        problems.append("default_warmup_fraction must be in [0, 1)")
    if issubclass(cls, TokenTuner) and (cls.supports_segmentation or cls.mergeable):
        problems.append("a TokenTuner can neither segment nor merge")
    if issubclass(cls, TokenTuner) and TokenTuner.token_seam not in needs:
        problems.append(f"a TokenTuner needs the {TokenTuner.token_seam!r} seam: register it with needs=(..., "
                        f"{TokenTuner.token_seam!r})")
    if set(needs) - set(SEAMS):
        problems.append(f"needs {sorted(set(needs) - set(SEAMS))} are not seams of any view ({', '.join(SEAMS)})")
    kinds = [k for k, base in TUNER_KINDS.items() if issubclass(cls, base)]
    if cls.head_only and kinds:
        problems.append(f"a head-only method changes nothing in the frozen model: it is no {kinds[0]} tuner")
    if not cls.head_only and not kinds:
        problems.append(f"say how it changes the frozen model: subclass one of {', '.join(t.__name__ for t in TUNER_KINDS.values())} "
                        "(or set head_only = True)")
    if problems:
        raise TypeError(f"method {name!r} ({cls.__qualname__}) breaks the Method contract: {'; '.join(problems)}")


def register(name: str, *, category: str, needs: tuple[str, ...] = (), description: str):
    """Class decorator adding a Method subclass to the registry under ``name``.

    ``needs``: the view seams the method can run on, any one of them (``"tokens"``: the token sequence of ViT,
    EVA and BEiT; ``"window-prompts"``: prompt keys/values in Swin's window attention; ``"attn-mlp"``: transformer
    blocks with ``attn`` and ``mlp`` sub-layers, on ViT, EVA, BEiT and Swin V1/V2). Leave it empty for a
    method that needs nothing but timm's own interfaces and module types: it runs on every view, including a
    family view added later."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}")

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _check_contract(name, cls, tuple(needs))
        info = MethodInfo(name, cls, category, tuple(needs), description)
        cls.info = info
        METHODS[name] = info
        return cls

    return deco


def resolve_method(name: str) -> tuple[MethodInfo, dict[str, object]]:
    """Registry lookup; ``partial-2``/``mlp-3`` are shorthand for ``k=2``/``k=3``."""
    if name in METHODS:
        return METHODS[name], {}
    base, _, k = name.rpartition("-")
    if base in METHODS and k.isdigit() and "k" in {f.name for f in option_fields(METHODS[base].config_class)}:
        return METHODS[base], {"k": int(k)}
    raise VistuneError(
        f"unknown method {name!r}.{suggest(name, METHODS)}",
        f"run `vistune methods` to list them ({', '.join(sorted(METHODS))})",
    )


def make_config(name: str, overrides: dict[str, object] | None = None, image_size: int | None = None) -> MethodConfig:
    """The config of method ``name`` with ``overrides``, built and validated once. ``image_size``: the input size,
    given to methods that size parameters by the input (their ``image_size`` option) when the overrides leave it
    unset."""
    info, implied = resolve_method(name)
    overrides = {**implied, **(overrides or {})}
    if image_size is not None and overrides.get("image_size") in (None, "none", "") and \
            "image_size" in {f.name for f in option_fields(info.config_class)}:
        overrides["image_size"] = image_size
    return info.config_class.from_overrides(overrides, info.name)


def method_of(config: MethodConfig) -> MethodInfo:
    """The registered method a config configures: its ``method`` link, else the one method of its type."""
    if config.method is not None:
        info, _ = resolve_method(config.method)
        if not isinstance(config, info.config_class):
            raise VistuneError(f"config {type(config).__name__} does not configure method {config.method!r}",
                               f"build it with make_config({config.method!r}, ...)")
        return info
    users = [i for i in METHODS.values() if i.config_class is type(config)]
    if len(users) != 1:
        names = ", ".join(i.name for i in users)
        raise VistuneError(
            f"{type(config).__name__} is " + (f"the config of several methods ({names})" if users else
                                               "not the config of a registered method"),
            "build it with make_config(name, ...) (or pass method=NAME), or pass the method's name to adapt()",
        )
    return users[0]


def adapt(backbone: BackboneView, config: MethodConfig | str, num_classes: int,
          task: str = "classification") -> Method:
    """Wrap a frozen backbone with a method and a ``num_classes`` head; the backbone is untouched.

    ``config``: a method name (default options) or a config from :func:`make_config`.
    ``task="segmentation"``: the head is an FPN decoder over the backbone's multi-scale features
    (methods/decoder.py) and the model returns per-pixel logits (B, num_classes, H, W)."""
    from .decoder import TASKS
    if isinstance(config, str):
        config = make_config(config)
    info = method_of(config)
    if not info.supports(backbone):
        raise VistuneError(
            f"method {info.name!r} does not support the {backbone.family} family (backbone {backbone.spec.name!r}, "
            f"a timm {type(backbone.model).__name__}): it needs {' or '.join(repr(n) for n in info.needs)} of the "
            "backbone, which that view does not offer",
            f"use a backbone of the families {', '.join(info.families)}, or a method that runs on any timm model; "
            "`vistune backbones --all` shows which method runs on which timm family",
        )
    if num_classes < 2:
        raise VistuneError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if task not in TASKS:
        raise VistuneError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    if task == "segmentation" and not info.method_class.supports_segmentation:
        able = sorted(n for n, i in METHODS.items() if i.method_class.supports_segmentation)
        raise VistuneError(
            f"method {info.name!r} does not support segmentation (it adds tokens or pads the input, calibrates on "
            "image labels, or trains a head on pooled features only)",
            f"use one of: {', '.join(able)} (linear = frozen backbone + decoder only)",
        )
    tuned = info.method_class.tuned_backbone_parameters(backbone, config)
    view = backbone.clone_for_tuning(tuned)
    model = info.method_class(view, config, num_classes)
    if task == "segmentation":
        from .decoder import make_decoder

        model.task = task
        model.head = make_decoder(model.backbone, num_classes)
    return model


def count_parameters(model: Method) -> dict[str, int]:
    """Tuned parameters (with and without the head) and the backbone's size."""
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    return {
        "tuned_params": tuned,
        "tuned_params_excluding_head": tuned - head,
        "backbone_params": model.backbone.num_params(),
    }
