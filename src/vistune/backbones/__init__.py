"""Load a backbone by name and wrap it in its family view.

A name is resolved in this order: ``--random-init`` (random weights, announced), a local
``--checkpoint`` file, vistune's own packaged backbones (``vistune/...``), the offline
packaged ImageNet CNNs, and finally the timm hub (needs a network connection). Without one
(``HF_HUB_OFFLINE`` set, or the hub's host unreachable: checked once per process, in seconds) weights
already in the local hub or torch cache are loaded from there, and anything else fails at once, naming the
offline backbones, instead of after minutes of download retries.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import urllib.parse

import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from ..errors import VistuneError, suggest
from .base import BackboneSpec, BackboneView
from .cnn import CNNView
from .offline import (
    OFFLINE_BACKBONES,
    OfflineBackbone,
    load_state_by_position,
    packaged_backbones,
    packaged_weights_path,
)
from .swin import SwinView
from .vit import ViTView

log = logging.getLogger("vistune")

FAMILY_VIEWS: list[tuple[tuple[type, ...], type[BackboneView]]] = [
    ((VisionTransformer,), ViTView),
    ((SwinTransformer,), SwinView),
    ((EfficientNet, MobileNetV3, ResNet, ConvNeXt), CNNView),
]
FAMILIES = ("vit", "swin", "cnn")

__all__ = [
    "BackboneSpec", "BackboneView", "CNNView", "SwinView", "ViTView", "FAMILIES",
    "load_backbone", "view_for", "OFFLINE_BACKBONES", "packaged_backbones",
]


def view_for(model: torch.nn.Module, spec: BackboneSpec) -> BackboneView:
    """Wrap a stock timm model (its classifier removed) in the view of its family."""
    for classes, view_cls in FAMILY_VIEWS:
        if isinstance(model, classes):
            model.reset_classifier(0)
            return view_cls(model, spec)
    raise VistuneError(
        f"backbone {spec.name!r} is a {type(model).__name__}, a family vistune has no view for",
        "use a timm VisionTransformer, SwinTransformer, EfficientNet/MobileNet, ResNet or ConvNeXt "
        "model (see `vistune backbones`)",
    )


def _offline_names() -> list[str]:
    return list(OFFLINE_BACKBONES) + list(packaged_backbones())


def _create(arch: str, spec_name: str, **kwargs) -> torch.nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            choices = [*timm.list_models(), *timm.list_models(pretrained=True), *_offline_names()]
            raise VistuneError(
                f"unknown backbone {spec_name!r}.{suggest(arch, choices)}",
                "run `vistune backbones` for the offline ones, or see timm.list_models() for timm names",
            ) from None
        raise


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's classifier(s) (timm's ``get_classifier()``; DeiT's gives two)."""
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = [m for m in (clf if isinstance(clf, tuple) else (clf,)) if isinstance(m, torch.nn.Module)]
    ids = {id(t) for m in heads for t in [*m.parameters(), *m.buffers()]}
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


def _file_card(path: str) -> dict:
    """What a vistune-written .safetensors file records about its model (``vistune remap``, ``export --merged``):
    architecture, model_kwargs and pretrained_cfg; {} for other files."""
    if not (path.lower().endswith(".safetensors") and os.path.isfile(path)):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return {k: (meta[k] if k == "architecture" else json.loads(meta[k]))
                for k in ("architecture", "model_kwargs", "pretrained_cfg") if k in meta}
    except Exception:  # an unreadable file or metadata: _load_file says what is wrong with the file
        return {}


def _file_kwargs(card: dict, path: str, arch: str, model_kwargs: dict, given: bool) -> dict:
    """The model options of a checkpoint: the file's own when the caller gave none, else the caller's, which
    must then agree with the file's."""
    if card.get("architecture", arch) != arch:
        raise VistuneError(f"{path} holds a timm {card['architecture']!r} model, not {arch!r}",
                           f"pass --backbone {card['architecture']} with this checkpoint")
    if "model_kwargs" not in card:
        return model_kwargs
    if not given:
        return dict(card["model_kwargs"])
    if json.loads(json.dumps(model_kwargs)) != card["model_kwargs"]:
        raise VistuneError(f"{path} was written for {arch} with options {card['model_kwargs']}, but the backbone "
                           f"was asked for with {model_kwargs}",
                           f"pass --backbone {arch} and no model options: the file's own are used")
    return model_kwargs


HUB_PROBE_SECONDS = 3.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (``HF_HUB_OFFLINE``, or no connection to its host), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    return _probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _probe_hub(endpoint: str) -> str | None:
    """One TCP connection to the hub's host, once per process (the hub client itself retries for minutes)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reached through a proxy: leave it to the hub client
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        return f"no connection to {host}: {e.strerror or e}"
    return None


def _cached_weights(model: torch.nn.Module) -> str | None:
    """The local file of a timm model's pretrained weights when an earlier download left it in the Hugging
    Face hub cache or torch's hub cache; None when it was never downloaded."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg["hf_hub_id"].partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        filename = os.path.basename(urllib.parse.urlsplit(cfg["url"]).path)
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if os.path.isfile(path):
            return path
    return None


def _no_hub_error(name: str, reason: str, offline: OfflineBackbone | None) -> VistuneError:
    if offline is not None:
        return VistuneError(f"backbone {name!r} needs the package {offline.package!r}, which is not installed, "
                            f"and the hub is not reachable ({reason})", f"install it: {offline.install}")
    return VistuneError(
        f"backbone {name!r} needs its pretrained weights from the Hugging Face hub, which is not reachable "
        f"({reason}), and they are not in the local cache.{suggest(name, _offline_names())}",
        f"use an offline backbone ({', '.join(_offline_names())}; see `vistune backbones`), pass --checkpoint FILE "
        "with local weights, or run once with a network connection (HF_HUB_OFFLINE unset) to cache them")


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
    kwargs_given = bool(model_kwargs) or name in packaged
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
        card = _file_card(checkpoint)
        model_kwargs = _file_kwargs(card, checkpoint, arch, model_kwargs, kwargs_given)
        model = _create(arch, name, pretrained=False, **model_kwargs)
        if "pretrained_cfg" in card:  # the preprocessing the weights were made for
            model = _with_card_cfg(model, card)
        _load_file(model, checkpoint, arch)
        spec = BackboneSpec(name, arch, "file", os.path.abspath(checkpoint), model_kwargs)
        return view_for(model, spec)
    if offline is not None and offline.available():
        model = _create(arch, name, pretrained=False, **model_kwargs)
        state = torch.load(offline.weights_path(), map_location="cpu", weights_only=True)
        load_state_by_position(model, state, offline.package)
        return view_for(model, BackboneSpec(name, arch, f"package:{offline.package}", None, model_kwargs))

    if arch.startswith(("hf-hub:", "hf_hub:")) and (reason := hub_unreachable()):
        raise _no_hub_error(name, reason, offline)  # even its config lives on the hub
    model = _create(arch, name, pretrained=False, **model_kwargs)  # validates the name offline
    if reason := hub_unreachable():
        cached = _cached_weights(model)
        if cached is None:
            raise _no_hub_error(name, reason, offline)
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached}, **model_kwargs)
        return view_for(model, BackboneSpec(name, arch, "hub", None, model_kwargs))
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
