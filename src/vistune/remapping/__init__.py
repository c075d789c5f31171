"""Remapping tuning (the Visual Tuning survey's fifth family), its weight- and architecture-remapping parts.

* :func:`select` — weight remapping by **weight selection** (Xu et al., ICLR 2024): a smaller model of the
  same family initialised with a subset of a larger pretrained model's weights (see ``selection``).
* :func:`grow` — architecture remapping by **function-preserving growth** (Net2Net, Chen et al., ICLR 2016):
  a deeper / wider model that computes exactly the source's features at initialisation (see ``growth``).
* :func:`save_remapped` — a ``.safetensors`` checkpoint whose metadata records the timm architecture, the
  ``model_kwargs`` and the preprocessing, so ``load_backbone(ARCH, checkpoint=FILE)`` (``vistune train
  --backbone ARCH --checkpoint FILE``) rebuilds it.

The command is ``vistune remap`` (:mod:`vistune.remapping.cli`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from .._io import atomic_write
from ..backbones import BackboneView
from ..errors import VistuneError
from .families import family_of
from .growth import grow_weights, identity_outputs, insertion_plan
from .selection import ELEMENT_RULES, LAYER_RULES, element_indices, layer_indices, select_weights
from .spec import ArchSpec, build_model, format_arch_spec, parse_arch_spec

GROWTH_TOLERANCE = 1e-4  # max |Δ feature| / max |feature| that the self-check of grow() accepts

__all__ = [
    "ArchSpec", "ELEMENT_RULES", "LAYER_RULES", "build_model", "check_out", "data_config", "element_indices",
    "features", "format_arch_spec", "grow", "grow_weights", "identity_outputs", "insertion_plan", "layer_indices",
    "parse_arch_spec", "probe_input", "save_remapped", "select", "select_weights",
]


def _loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict(state)
    return model.eval()


def select(source: BackboneView, architecture: str, options: dict, *, layers: str = "first",
           elements: str = "uniform") -> nn.Module:
    """A headless timm ``architecture(**options)`` initialised by weight selection from ``source``."""
    family_of(source.model, f"the source {source.spec.name}")
    student = build_model(architecture, options)
    name = format_arch_spec(architecture, options)
    return _loaded(student, select_weights(source.model, student, layers=layers, elements=elements,
                                           student_name=name))


def probe_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random image batch the model takes: a ViT's fixed input size, else 64×64."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (64, 64)
    chans = timm.data.resolve_data_config({}, model=model)["input_size"][0]
    return torch.randn(batch, chans, *size, generator=torch.Generator().manual_seed(seed))


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logit feature (what a vistune head reads)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def grow(source: BackboneView, architecture: str, options: dict, *, seed: int = 0) -> nn.Module:
    """A headless timm ``architecture(**options)``, deeper and/or with wider ViT MLPs than ``source``, that
    computes the source's features; checked on a random batch before it is returned."""
    family_of(source.model, f"the source {source.spec.name}")
    name = format_arch_spec(architecture, options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the fresh init of new blocks that cannot copy their neighbour
        target = build_model(architecture, options)
    grown = _loaded(target, grow_weights(source.model, target, seed=seed, target_name=name))
    x = probe_input(grown)
    want, got = features(source.model, x), features(grown, x)
    if want.shape != got.shape or (got - want).abs().max() > GROWTH_TOLERANCE * want.abs().max():
        raise VistuneError(f"growing {source.spec.name} into {name} did not preserve its features (an architecture "
                           "variant the growth rules do not cover)",
                           "grow a standard timm model of the family, or report this combination")
    return grown


def data_config(model: nn.Module) -> dict:
    """timm's preprocessing of ``model`` (input size, interpolation, mean/std, crop) as JSON types."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def check_out(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as the checkpoint to write: a .safetensors name that holds nothing yet (or ``overwrite``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VistuneError(f"--out {path}: remapped checkpoints are .safetensors files", "end the name in .safetensors")
    if path.exists() and not overwrite:
        raise VistuneError(f"--out {path} already exists", "choose another name, or add --overwrite to replace it")
    return path


def save_remapped(path: str | os.PathLike, model: nn.Module, *, architecture: str, options: dict,
                  source: BackboneView, how: dict, overwrite: bool = False) -> None:
    """Write the model's state dict as safetensors, atomically, with the metadata ``load_backbone`` reads:
    ``architecture``, ``model_kwargs`` (JSON), ``pretrained_cfg`` (the source's preprocessing) and ``remap``
    (how it was made, from which backbone). An existing file is replaced only with ``overwrite``."""
    path = check_out(path, overwrite)
    spec = source.spec
    metadata = {
        "format": "timm-state-dict",
        "architecture": architecture,
        "model_kwargs": json.dumps(options),
        "pretrained_cfg": json.dumps(data_config(source.model)),
        "remap": json.dumps({**how, "source": {"name": spec.name, "architecture": spec.architecture,
                                               "model_kwargs": spec.model_kwargs, "weights": spec.source,
                                               "checkpoint": spec.checkpoint, "fingerprint": source.fingerprint()},
                             "vistune": __version__}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
