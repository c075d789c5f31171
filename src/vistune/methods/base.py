"""What every method shares: the typed config, the adapted-model base class, the registry.

A method is one file: a ``@dataclass`` config whose fields carry help text, and a subclass of
:class:`Method` registered with :func:`register`. ``adapt()`` builds it over a *copy* of the
backbone view that shares every frozen tensor, so the caller's backbone is never modified.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..backbones import FAMILIES, BackboneView
from ..errors import VistuneError, suggest

CATEGORIES = ("fine-tuning", "prompt", "adapter", "parameter", "remapping")


def option(default, help: str, **kwargs):
    """A config field with help text (shown by `vistune methods --details` and `--set` errors)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Base of every method's config; ``head_init`` is shared by all classification heads."""

    def validate(self) -> None:
        """Raise VistuneError for out-of-range values; subclasses extend."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fields_help(cls) -> dict[str, tuple[str, object, str]]:
        hints = typing.get_type_hints(cls)
        return {
            f.name: (_type_name(hints[f.name]), _default(f), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def from_overrides(cls, overrides: dict[str, object], method: str) -> "MethodConfig":
        """Build from ``--set key=value`` strings (or already-typed values)."""
        valid = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in overrides.items():
            if key not in valid:
                raise VistuneError(
                    f"method {method!r} has no option {key!r}.{suggest(key, valid)}",
                    f"valid keys: {', '.join(valid) or '(none)'}",
                )
            kwargs[key] = _coerce(value, hints[key], f"{method}.{key}")
        config = cls(**kwargs)
        config.validate()
        return config


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
    if args and typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
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


class Method(nn.Module):
    """An adapted model: a frozen backbone view, the method's few parameters, and a head."""

    info: ClassVar["MethodInfo"]
    Config: ClassVar[type[MethodConfig]]
    # may ``adapt(..., task="segmentation")`` put an FPN decoder (methods/decoder.py) over this method's
    # backbone? False for methods that add tokens, pad the input, calibrate on class labels or cache features
    supports_segmentation: ClassVar[bool] = False
    task: str = "classification"  # set by adapt(); "segmentation": head = FPN decoder, logits (B, K, H, W)

    def __init__(self, backbone: BackboneView, config: MethodConfig, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes

    # ---- what subclasses may override -----------------------------------------------------
    @classmethod
    def tuned_backbone_parameters(cls, backbone: BackboneView, config) -> set[str]:
        """Names of backbone parameters this method trains (cloned before training)."""
        return set()

    def backbone_train_modules(self) -> list[nn.Module]:
        """Backbone modules that run in train mode while training (all others stay in eval)."""
        return []

    def prepare(self, train_set, *, device: torch.device, batch_size: int, progress: bool) -> None:
        """Data-dependent set-up before training (e.g. SCT's calibration pass); default: none.

        ``train_set`` yields un-augmented (image, label) pairs of the training split."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
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


@dataclass(frozen=True)
class MethodInfo:
    name: str
    method_class: type[Method]
    category: str
    families: tuple[str, ...]
    description: str

    @property
    def config_class(self) -> type[MethodConfig]:
        return self.method_class.Config


METHODS: dict[str, MethodInfo] = {}


def register(name: str, *, category: str, families: tuple[str, ...] = FAMILIES, description: str):
    """Class decorator adding a Method subclass to the registry under ``name``."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}")

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        info = MethodInfo(name, cls, category, tuple(families), description)
        cls.info = info
        METHODS[name] = info
        return cls

    return deco


def resolve_method(name: str) -> tuple[MethodInfo, dict[str, object]]:
    """Registry lookup; ``partial-2``/``mlp-3`` are shorthand for ``k=2``/``k=3``."""
    if name in METHODS:
        return METHODS[name], {}
    base, _, k = name.rpartition("-")
    if base in METHODS and k.isdigit() and "k" in {f.name for f in dataclasses.fields(METHODS[base].config_class)}:
        return METHODS[base], {"k": int(k)}
    raise VistuneError(
        f"unknown method {name!r}.{suggest(name, METHODS)}",
        f"run `vistune methods` to list them ({', '.join(sorted(METHODS))})",
    )


def make_config(name: str, overrides: dict[str, object] | None = None, image_size: int | None = None) -> MethodConfig:
    """The config of method ``name`` with ``overrides``. ``image_size``: the input size, given to methods that
    size parameters by the input (their ``image_size`` option) when the overrides leave it unset."""
    info, implied = resolve_method(name)
    config = info.config_class.from_overrides({**implied, **(overrides or {})}, info.name)
    if image_size is not None and getattr(config, "image_size", "absent") is None:
        config.image_size = image_size
    return config


def adapt(backbone: BackboneView, config: MethodConfig | str, num_classes: int,
          task: str = "classification") -> Method:
    """Wrap a frozen backbone with a method and a ``num_classes`` head; the backbone is untouched.

    ``task="segmentation"``: the head is an FPN decoder over the backbone's multi-scale features
    (methods/decoder.py) and the model returns per-pixel logits (B, num_classes, H, W)."""
    from .decoder import TASKS
    if isinstance(config, str):
        config = make_config(config)
    info = next((i for i in METHODS.values() if i.config_class is type(config)), None)
    if info is None:
        raise VistuneError(f"{type(config).__name__} is not the config of a registered method")
    if backbone.family not in info.families:
        raise VistuneError(
            f"method {info.name!r} does not support the {backbone.family} family "
            f"(backbone {backbone.spec.name!r})",
            f"it supports: {', '.join(info.families)}; `vistune methods` lists which method fits which family",
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
    config.validate()
    tuned = info.method_class.tuned_backbone_parameters(backbone, config)
    view = backbone.clone_for_tuning(tuned)
    model = info.method_class(view, config, num_classes)
    if task == "segmentation":
        from .decoder import make_decoder

        model.task = task
        model.trains_head_only = False  # the decoder reads feature maps: no pooled-feature cache
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
