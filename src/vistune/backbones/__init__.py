"""Load a backbone by name and wrap it in its family view.

A name is resolved in this order: ``--random-init`` (random weights, announced), a local
``--checkpoint`` file, vistune's own packaged backbones (``vistune/...``), the offline
packaged ImageNet CNNs, and finally the timm hub (needs a network connection).
"""
from __future__ import annotations

import logging
import os

import timm
import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer

from ..errors import VistuneError, suggest
from .base import BackboneSpec, BackboneView, Borrowed, Layout
from .beit import BeitView
from .eva import EvaView
from .offline import (
    OFFLINE_BACKBONES,
    load_state_by_position,
    packaged_backbones,
    packaged_weights_path,
)
from .swin import SwinV2View, SwinView
from .vit import ViTView

log = logging.getLogger("vistune")

# Family views: only where a method needs the token sequence or the window attention. Every other timm model
# gets the generic view (BackboneView itself). The first matching class wins.
FAMILY_VIEWS: list[tuple[tuple[type, ...], type[BackboneView]]] = [
    ((VisionTransformer,), ViTView),
    ((Eva,), EvaView),
    ((Beit,), BeitView),
    ((SwinTransformer,), SwinView),
    ((SwinTransformerV2,), SwinV2View),
]
VIEWS: tuple[type[BackboneView], ...] = (*(view for _, view in FAMILY_VIEWS), BackboneView)
FAMILIES = tuple(view.family for view in VIEWS)
SEAMS = tuple(sorted({seam for view in VIEWS for seam in view.seams}))
TIMM_INTERFACE = ("forward_features", "forward_head", "reset_classifier")

__all__ = [
    "BackboneSpec", "BackboneView", "BeitView", "Borrowed", "EvaView", "Layout", "SwinView", "SwinV2View",
    "ViTView", "FAMILIES", "FAMILY_VIEWS", "SEAMS", "VIEWS", "load_backbone", "view_for", "view_class_for",
    "OFFLINE_BACKBONES", "packaged_backbones",
]


def view_class_for(model: torch.nn.Module) -> type[BackboneView]:
    """The family view of a timm model's class; the generic view for every other timm model."""
    for classes, view_cls in FAMILY_VIEWS:
        if isinstance(model, classes):
            return view_cls
    return BackboneView


def view_for(model: torch.nn.Module, spec: BackboneSpec) -> BackboneView:
    """Wrap a stock timm model (its classifier removed) in the view of its family, or the generic view."""
    missing = [a for a in TIMM_INTERFACE if not callable(getattr(model, a, None))]
    if missing:
        raise VistuneError(
            f"backbone {spec.name!r} is a {type(model).__name__} without timm's model interface "
            f"({', '.join(missing)} missing)",
            "use a timm model (timm.list_models()); vistune reaches backbones only through timm's interfaces",
        )
    model.reset_classifier(0)
    return view_class_for(model)(model, spec)


def _create(arch: str, spec_name: str, **kwargs) -> torch.nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            choices = list(timm.list_models()) + list(OFFLINE_BACKBONES) + list(packaged_backbones())
            raise VistuneError(
                f"unknown backbone {spec_name!r}.{suggest(arch, choices)}",
                "run `vistune backbones` for the offline ones, or see timm.list_models() for timm names",
            ) from None
        raise


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (timm's ``get_classifier()``)."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(clf, torch.nn.Module):
        return set()
    ids = {id(t) for t in [*clf.parameters(), *clf.buffers()]}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def _with_card_cfg(model: torch.nn.Module, card: dict) -> torch.nn.Module:
    """Give a model its card's preprocessing (set directly: older timm ignores
    pretrained_cfg_overlay when pretrained=False)."""
    model.pretrained_cfg = {**model.pretrained_cfg, **card.get("pretrained_cfg", {})}
    return model


def _load_file(model: torch.nn.Module, path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise VistuneError(f"checkpoint file not found: {path}", "check the --checkpoint path")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # SafetensorError, OSError, ...
            raise VistuneError(f"{path} is not a readable safetensors file ({e})",
                               "check the --checkpoint path, or re-save the weights") from None
    elif ext == ".npz":
        # timm's own loader understands big_vision/JAX .npz checkpoints of ViTs
        if not hasattr(model, "load_pretrained"):
            raise VistuneError(f"{path}: .npz checkpoints are only understood for ViT models")
        model.load_pretrained(path)
        return
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VistuneError(
                f"{path} could not be read as a plain weights file ({type(e).__name__}); vistune "
                "never unpickles arbitrary objects",
                "save the weights as a state_dict (torch.save(model.state_dict(), f)) or as .safetensors",
            ) from None
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    else:
        raise VistuneError(
            f"{path}: unknown checkpoint format {ext!r}", "use .safetensors, .pth/.pt or .npz"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # The classifier is dropped (view_for), so a headless checkpoint, or one whose head has another
    # number of classes, fits as long as every other tensor is there.
    body = set(own) - _classifier_keys(model)
    if body <= set(state):
        try:
            model.load_state_dict({k: state[k] for k in body}, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise VistuneError(
                f"{path} does not fit timm architecture {name!r}: {str(e).splitlines()[-1].strip()}",
                "check that --backbone names the architecture (and model options) these weights were trained with",
            ) from None
        return
    try:
        load_state_by_position(model, state, path)
    except VistuneError:
        missing = sorted(set(own) - set(state))[:5]
        raise VistuneError(
            f"{path} does not fit timm architecture {name!r}: e.g. missing {missing}",
            "check that --backbone names the architecture these weights were trained with",
        ) from None


def load_backbone(
    name: str,
    *,
    checkpoint: str | None = None,
    random_init: bool = False,
    model_kwargs: dict | None = None,
) -> BackboneView:
    """Build a frozen backbone view from a timm name, a local file or an offline package."""
    model_kwargs = dict(model_kwargs or {})
    packaged = packaged_backbones()
    if name in packaged and not random_init and checkpoint is None:
        card = packaged[name]
        arch, kwargs = card["architecture"], {**card.get("model_kwargs", {}), **model_kwargs}
        model = _with_card_cfg(_create(arch, name, pretrained=False, num_classes=0, **kwargs), card)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(packaged_weights_path(card)))
        spec = BackboneSpec(name, arch, f"vistune:{card['weights']}", None, kwargs)
        return view_for(model, spec)

    offline = OFFLINE_BACKBONES.get(name)
    arch = offline.architecture if offline else name
    if name in packaged:
        arch = packaged[name]["architecture"]
        model_kwargs = {**packaged[name].get("model_kwargs", {}), **model_kwargs}
    if random_init:
        log.warning("backbone %s: RANDOM weights (--random-init), not pretrained", name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random backbone every time, so artifacts reload
            model = _create(arch, name, pretrained=False, **model_kwargs)
        if name in packaged:  # same architecture and preprocessing as the packaged weights
            model = _with_card_cfg(model, packaged[name])
        return view_for(model, BackboneSpec(name, arch, "random-init", None, model_kwargs))
    if checkpoint is not None:
        model = _create(arch, name, pretrained=False, **model_kwargs)
        _load_file(model, checkpoint, arch)
        spec = BackboneSpec(name, arch, "file", os.path.abspath(checkpoint), model_kwargs)
        return view_for(model, spec)
    if offline is not None and offline.available():
        model = _create(arch, name, pretrained=False, **model_kwargs)
        state = torch.load(offline.weights_path(), map_location="cpu", weights_only=True)
        load_state_by_position(model, state, offline.package)
        return view_for(model, BackboneSpec(name, arch, f"package:{offline.package}", None, model_kwargs))

    model = _create(arch, name, pretrained=False, **model_kwargs)  # validates the name offline
    try:
        model = timm.create_model(arch, pretrained=True, **model_kwargs)
    except Exception as e:  # hub/network failures come in many exception types
        hint = f"install its offline package: {offline.install}" if offline else (
            "connect to the internet, pass --checkpoint FILE with local weights, or use an offline "
            "backbone (`vistune backbones`)"
        )
        raise VistuneError(
            f"could not download pretrained weights for {name!r} ({type(e).__name__}: {str(e)[:200]})",
            hint,
        ) from None
    return view_for(model, BackboneSpec(name, arch, "hub", None, model_kwargs))
