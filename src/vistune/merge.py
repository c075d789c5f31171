"""Fold a trained weight-space method into its backbone, and export to timm's or peft's format.

``merge(model)`` gives a plain timm model — the stock module types, the stock parameter count, so
exactly the bare backbone's inference cost — with the method's head as timm's own classifier, that
computes the adapted model's logits. It works for every method that declares ``mergeable`` (the Method
contract): its change lives in the backbone's weights, and every module it wraps in is a peft layer (merged by
peft's per-layer ``merge``) or :class:`~vistune.methods.Foldable` (it knows its merged form: the split qkv,
SSF's scale and shift). Methods that add modules or tokens (adapters, prompts, side networks) are refused.

All work happens on a deep copy (own tensors), so neither the adapted model nor the frozen backbone
it shares tensors with is ever modified.

``export_peft(model, dir)`` writes peft's own ``adapter_model.safetensors`` + ``adapter_config.json``
for the stock timm model: split q/k/v targets are rewritten as one adapter on the fused ``qkv``
Linear that computes the same function (LoRA: rank n·r with block-structured B; DoRA: untargeted
rows keep magnitude ‖W‖; IA3: ones for untargeted rows), and the head is saved as peft
``modules_to_save`` on timm's classifier.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_dir, atomic_write
from .errors import VistuneError
from .methods import METHODS, Foldable, Method
from .methods.peft_common import ADAPTER_NAME, QKV, FusedSlice, PeftMethod, SplitQKV, exact_names, require_peft

PEFT_EXPORT_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}  # save_pretrained writes


def mergeable_methods() -> list[str]:
    return sorted(n for n, i in METHODS.items() if i.method_class.mergeable)


def peft_methods() -> list[str]:
    return sorted(n for n, i in METHODS.items() if issubclass(i.method_class, PeftMethod))


def merge(model: Method) -> nn.Module:
    """A plain timm model (eval mode, frozen) whose logits equal ``model``'s."""
    name = model.info.name
    works_for = f"merge works for {', '.join(mergeable_methods())}"
    if not model.mergeable or model.task != "classification" or not isinstance(model.head, nn.Linear):
        raise VistuneError(f"method {name!r} computes more than the backbone and a linear head: it cannot merge",
                           works_for)
    require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    def fold(module: nn.Module) -> nn.Module:
        """Children first: a FusedSlice becomes a plain Linear before peft merges into it."""
        for child_name, child in list(module.named_children()):
            new = fold(child)
            if new is not child:
                setattr(module, child_name, new)
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            return module.get_base_layer()
        return module.merged() if isinstance(module, Foldable) else module

    merged = fold(copy.deepcopy(model.backbone.model))
    merged.__dict__.pop("peft_config", None)  # set by peft's injection
    foreign = sorted({type(m).__qualname__ for m in merged.modules()
                      if type(m).__module__.split(".")[0] not in ("timm", "torch")})
    n_params = sum(p.numel() for p in merged.parameters())
    if foreign or n_params != model.backbone.num_params():
        raise VistuneError(
            f"method {name!r} leaves modules the stock model does not have ({', '.join(foreign) or 'none'}; "
            f"{n_params:,} vs {model.backbone.num_params():,} parameters): it cannot merge", works_for)
    _attach_head(merged, model)
    return merged.eval().requires_grad_(False)


def _attach_head(timm_model: nn.Module, model: Method) -> str:
    """Give the timm model the method's head as its own classifier; returns the classifier's name."""
    timm_model.reset_classifier(model.num_classes)
    classifier = timm_model.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != model.head.weight.shape:
        raise VistuneError(
            f"timm's classifier of {model.backbone.spec.architecture} ({classifier}) does not take the method's "
            f"head {tuple(model.head.weight.shape)}",
            "export without merging: the vistune artifact (adapter.safetensors) holds the head")
    with torch.no_grad():
        classifier.weight.copy_(model.head.weight)
        classifier.bias.copy_(model.head.bias)
    return next(n for n, m in timm_model.named_modules() if m is classifier)


def _model_card(model: Method) -> dict[str, str]:
    spec = model.backbone.spec
    return {"architecture": spec.architecture, "model_kwargs": json.dumps(spec.model_kwargs),
            "num_classes": str(model.num_classes), "vistune_method": model.info.name,
            "backbone": spec.name, "backbone_fingerprint": model.backbone.fingerprint()}


def inference_preprocessing(preprocessing: dict) -> dict | None:
    """What an input image must go through for the model (the artifact's eval transform, read off the very
    torchvision transform vistune evaluates with): ``resize`` ([H, W], or N: the shorter side to N), its
    ``interpolation``, ``center_crop`` ([H, W] or None), then RGB scaled to [0, 1] and ``(x - mean) / std``.
    None when the artifact records no preprocessing."""
    from .data import build_transforms

    if not preprocessing.get("data_config") or not preprocessing.get("image_size"):
        return None
    _, eval_tf = build_transforms(preprocessing["data_config"], image_size=preprocessing["image_size"],
                                  normalization=preprocessing.get("normalization", "pretrained_cfg"),
                                  augment=preprocessing.get("augment", False))
    out = {"image_size": preprocessing["image_size"], "color": "RGB", "center_crop": None,
           "scale": "pixel / 255 (torchvision ToTensor), then (x - mean) / std"}
    for step in eval_tf.transforms:
        kind = type(step).__name__
        if kind == "Resize":
            out["resize"] = list(step.size) if isinstance(step.size, (list, tuple)) else step.size
            out["interpolation"] = step.interpolation.value
        elif kind == "CenterCrop":
            out["center_crop"] = list(step.size)
        elif kind == "Normalize":
            out["mean"], out["std"] = [float(v) for v in step.mean], [float(v) for v in step.std]
    return out


def describe_preprocessing(prep: dict | None) -> str:
    """:func:`inference_preprocessing` in one line."""
    if prep is None:
        return "not recorded in the artifact"
    resize = prep["resize"]
    steps = [f"resize to {resize[0]}×{resize[1]}" if isinstance(resize, list)
             else f"resize the shorter side to {resize}"]
    if prep["center_crop"]:
        steps.append(f"center-crop {prep['center_crop'][0]}×{prep['center_crop'][1]}")
    mean, std = (", ".join(f"{v:.4g}" for v in prep[k]) for k in ("mean", "std"))
    return (f"RGB, {' then '.join(steps)} ({prep['interpolation']}), pixel / 255, then (x - mean) / std with "
            f"mean ({mean}), std ({std})")


def export_merged(model: Method, path: str | os.PathLike, class_names: list[str] | None = None,
                  preprocessing: dict | None = None) -> nn.Module:
    """Write the merged model's timm state_dict (incl. the classifier) as safetensors; returns the model.

    Load it with ``timm.create_model(architecture, num_classes=N, **model_kwargs)`` and
    ``load_state_dict(safetensors.torch.load_file(path))``; both are in the file's metadata, with
    ``class_names`` and, given the artifact's ``preprocessing``, the input transform the model expects
    (``preprocessing``: JSON of :func:`inference_preprocessing`)."""
    merged = merge(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    metadata = {"format": "timm-state-dict", **_model_card(model), "class_names": json.dumps(class_names or [])}
    prep = inference_preprocessing(preprocessing or {})
    if prep is not None:
        metadata["preprocessing"] = json.dumps(prep)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return merged


def _stock_copy(model: PeftMethod) -> nn.Module:
    """A deep copy of the backbone with every vistune wrapper and peft layer removed (nothing merged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def strip(module: nn.Module) -> nn.Module:
        if isinstance(module, SplitQKV):
            return module.fused
        if isinstance(module, BaseTunerLayer):
            return strip(module.get_base_layer())
        for child_name, child in list(module.named_children()):
            new = strip(child)
            if new is not child:
                setattr(module, child_name, new)
        return module

    stock = strip(copy.deepcopy(model.backbone.model))
    stock.__dict__.pop("peft_config", None)
    return stock


def _fused_groups(model: PeftMethod) -> dict[str, dict[str, nn.Module]]:
    """qkv module name → {"q"/"k"/"v": its peft layer} for the split fused Linears."""
    groups: dict[str, dict[str, nn.Module]] = {}
    for name, module in model.backbone.model.named_modules():
        if isinstance(module, SplitQKV):
            parts = {p: getattr(module, p) for p in QKV if not isinstance(getattr(module, p), FusedSlice)}
            if parts:
                groups[name] = parts
    return groups


def _export_config(model: PeftMethod, groups: dict, classifier: str):
    """The method's peft config, retargeted at the stock model (fused qkv instead of q/k/v)."""
    config = model.backbone.model.peft_config[ADAPTER_NAME]
    split = {f"{g}.{p}" for g, parts in groups.items() for p in parts}
    targets = (set(model.targets) - split) | set(groups)
    changes = {"target_modules": exact_names(targets), "modules_to_save": [classifier]}
    if hasattr(config, "lora_alpha"):  # LoRA / DoRA: rank n·r on the fused Linear, same scaling
        scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        ranks = {re.escape(g): len(parts) * config.r for g, parts in groups.items()}
        changes["rank_pattern"] = ranks
        changes["alpha_pattern"] = {k: scaling * (math.sqrt(r) if config.use_rslora else r) for k, r in ranks.items()}
    if hasattr(config, "feedforward_modules"):
        changes["feedforward_modules"] = exact_names(n for n, role in model.targets.items() if role == "fc2")
    return dataclasses.replace(config, **changes)


@torch.no_grad()
def _copy_fused(dst: nn.Module, parts: dict[str, nn.Module], fused: nn.Linear) -> None:
    """Write the q/k/v adapters of ``parts`` as one adapter on the fused Linear ``dst``."""
    d = fused.out_features // 3
    if hasattr(dst, "ia3_l"):
        dst.ia3_l[ADAPTER_NAME].copy_(torch.cat([
            parts[p].ia3_l[ADAPTER_NAME] if p in parts else torch.ones_like(dst.ia3_l[ADAPTER_NAME][:d])
            for p in QKV]))
        return
    a, b = dst.lora_A[ADAPTER_NAME].weight, dst.lora_B[ADAPTER_NAME].weight
    b.zero_()
    present = [p for p in QKV if p in parts]
    r = parts[present[0]].lora_A[ADAPTER_NAME].weight.shape[0]
    for j, p in enumerate(present):
        i = QKV.index(p)
        a[j * r:(j + 1) * r] = parts[p].lora_A[ADAPTER_NAME].weight
        b[i * d:(i + 1) * d, j * r:(j + 1) * r] = parts[p].lora_B[ADAPTER_NAME].weight
    if ADAPTER_NAME in getattr(dst, "lora_magnitude_vector", {}):  # DoRA: untouched rows keep m = ‖W‖
        rows = torch.linalg.norm(fused.weight, dim=1).view(3, d)
        dst.lora_magnitude_vector[ADAPTER_NAME].weight.copy_(torch.cat([
            parts[p].lora_magnitude_vector[ADAPTER_NAME].weight if p in parts else rows[i]
            for i, p in enumerate(QKV)]))


def export_peft(model: Method, out_dir: str | os.PathLike) -> Path:
    """Write peft's adapter_model.safetensors + adapter_config.json for the stock timm model.

    Load with ``PeftModel.from_pretrained(timm.create_model(arch, pretrained=True, num_classes=N), out_dir)``."""
    if not isinstance(model, PeftMethod):
        raise VistuneError(f"method {model.info.name!r} is not a peft method: there is no peft format for it",
                           f"--peft works for {', '.join(peft_methods())}; use --merged FILE for a plain timm model")
    peft = require_peft()
    groups = _fused_groups(model)
    stock = _stock_copy(model)
    classifier = _attach_head(stock, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")  # LN-tuning's norms; harmless
        exported = peft.get_peft_model(stock, _export_config(model, groups, classifier), adapter_name=ADAPTER_NAME)
    target_root = exported.base_model.model
    split = {f"{g}.{p}" for g, parts in groups.items() for p in parts}
    with torch.no_grad():
        for name in model.targets:
            if name in split:
                continue
            src = model.backbone.model.get_submodule(name)
            state = {k: v for k, v in src.state_dict().items() if not k.startswith("base_layer.")}
            unexpected = target_root.get_submodule(name).load_state_dict(state, strict=False).unexpected_keys
            assert not unexpected, f"peft layer layout changed: {unexpected}"
        for name, parts in groups.items():
            _copy_fused(target_root.get_submodule(name), parts, model.backbone.model.get_submodule(name).fused)
    out = Path(out_dir)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in PEFT_EXPORT_FILES) if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        raise VistuneError(f"--peft {out}: exists and holds files that are not a peft export "
                           f"({', '.join(foreign[:5]) or 'it is a file'})",
                           "choose a new folder: an export replaces only a previous export")
    with atomic_dir(out) as staging:
        exported.save_pretrained(str(staging))
    return out
