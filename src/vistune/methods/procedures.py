"""Training procedures of the remapping family: registered beside the methods, not as methods.

The Visual Tuning survey's fifth family, *remapping tuning*, moves what a pretrained model knows into another
model — knowledge distillation (into a student's function), weight remapping (weight selection: into a smaller
model's initial weights) and architecture remapping (growth: into a larger model's). None of them is a way of
tuning a frozen backbone: each is a procedure *around* a method — the student (or the remapped backbone) is still
adapted by any registered method (linear, lora, full, …), and what comes out is that method's normal artifact.
So they are not :class:`~vistune.methods.Method` subclasses; they are :class:`ProcedureInfo` entries here, which
`vistune methods` lists after the methods (category ``remapping``, kind ``procedure``) with their options, the
command that runs them, and — for those `vistune bench` can run — the bench label ``PROCEDURE:METHOD`` (e.g.
``distill:linear``: the method ``linear``, trained by distillation).

A procedure's options are a :class:`~vistune.methods.MethodConfig` subclass like a method's (``option()`` fields
with help, ``validate()`` once when built), whose ``method`` link names the procedure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import VistuneError, suggest
from .base import CATEGORIES, MethodConfig, option, resolve_method

LABEL_SEPARATOR = ":"  # bench label PROCEDURE:METHOD


@dataclass(frozen=True)
class ProcedureInfo:
    name: str
    category: str
    description: str
    command: str  # the vistune command that runs it
    paper: str
    config_class: type[MethodConfig] | None = None  # its options (None: the command's own flags)
    bench: bool = False  # can `vistune bench` run it (method label PROCEDURE:METHOD)?


PROCEDURES: dict[str, ProcedureInfo] = {}


def register_procedure(info: ProcedureInfo) -> ProcedureInfo:
    if info.category not in CATEGORIES:
        raise ValueError(f"procedure {info.name!r}: category must be one of {CATEGORIES}")
    if info.name in PROCEDURES:
        raise ValueError(f"procedure {info.name!r} registered twice")
    PROCEDURES[info.name] = info
    return info


@dataclass
class DistillConfig(MethodConfig):
    """Knowledge distillation's options (the loss of Hinton et al. 2015, an optional FitNets-style feature term)."""

    temperature: float = option(4.0, "softmax temperature T of the teacher's and the student's logits in the KD term")
    alpha: float = option(0.5, "weight α of the label cross-entropy; the KD term gets 1−α (α=1: labels only)")
    feature_loss: Literal["none", "mse", "cosine"] = option(
        "none", "feature distillation: a learned linear projector maps the student's pooled feature onto the "
                "teacher's (FitNets' hint regressor), scored by mse or cosine distance")
    feature_weight: float = option(1.0, "weight β of the feature term (with feature_loss mse/cosine)")
    cache_teacher: bool = option(True, "without augmentation, run the frozen teacher once per image and keep its "
                                       "outputs (false: run it on every batch — same training, slower)")

    def validate(self) -> None:
        if not self.temperature > 0:
            raise VistuneError(f"distill: temperature={self.temperature} must be > 0", "e.g. --temperature 4")
        if not 0 <= self.alpha <= 1:
            raise VistuneError(f"distill: alpha={self.alpha} must be in [0, 1]",
                               "e.g. --alpha 0.5 (0: KD term only, 1: labels only)")
        if self.feature_weight < 0:
            raise VistuneError(f"distill: feature_weight={self.feature_weight} must be ≥ 0", "e.g. 1.0")
        if self.alpha == 1 and self.feature_loss == "none":
            raise VistuneError("distill: alpha=1 with feature_loss none leaves no distillation term (labels only)",
                               "use --alpha below 1, or `vistune train` for a labels-only run")


DISTILL = register_procedure(ProcedureInfo(
    name="distill", category="remapping", bench=True, config_class=DistillConfig,
    description="knowledge distillation: a student (any backbone, any method) learns from a vistune artifact's "
                "softened logits, optionally its pooled features and unlabelled images",
    command="vistune distill --teacher RUN --student BACKBONE --method M",
    paper="Hinton et al. 2015 (KD); Romero et al. 2015 (FitNets, feature hints)",
))
register_procedure(ProcedureInfo(
    name="weight-selection", category="remapping",
    description="weight remapping: a smaller model of the family initialised with a subset of a pretrained "
                "model's weights, then adapted by any method",
    command="vistune remap", paper="Xu et al. 2024 (weight selection)",
))
register_procedure(ProcedureInfo(
    name="growth", category="remapping",
    description="architecture remapping: a deeper/wider model that computes the pretrained one's function at "
                "initialisation, then adapted by any method",
    command="vistune remap", paper="Chen et al. 2016 (Net2Net)",
))


def procedure_config(name: str, overrides: dict[str, object] | None = None) -> MethodConfig:
    """The options of procedure ``name`` with ``overrides`` (strings or typed values), built and validated once."""
    info = resolve_procedure(name)
    if info.config_class is None:
        raise VistuneError(f"procedure {name!r} takes no options here", f"see `{info.command} --help`")
    return info.config_class.from_overrides(overrides or {}, info.name)


def resolve_procedure(name: str) -> ProcedureInfo:
    if name in PROCEDURES:
        return PROCEDURES[name]
    raise VistuneError(f"unknown procedure {name!r}.{suggest(name, PROCEDURES)}",
                       f"procedures: {', '.join(PROCEDURES)} (`vistune methods`)")


def split_label(label: str) -> tuple[ProcedureInfo | None, str]:
    """A bench method label → (procedure, method): ``distill:lora`` → (distill, "lora"); ``lora`` → (None, "lora").
    The method is checked against the registry; a procedure the bench cannot run is refused."""
    procedure, sep, method = label.partition(LABEL_SEPARATOR)
    if not sep:
        return None, label
    info = resolve_procedure(procedure.strip())
    if not info.bench:
        raise VistuneError(f"{label!r}: `vistune bench` cannot run {info.name!r}",
                           f"run it with `{info.command}`; the bench runs: "
                           f"{', '.join(n + ':METHOD' for n, p in PROCEDURES.items() if p.bench)}")
    method = method.strip()
    if not method:
        raise VistuneError(f"{label!r} names no student method", f"write e.g. {info.name}:linear")
    resolve_method(method)
    return info, method
