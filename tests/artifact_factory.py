"""Artifacts of every method on the tiny test backbones, with every tuned tensor moved off its init (so a task's
change to the frozen model is visible): shared by the multi-task, serving and ONNX tests."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import IMAGE_SIZE
from vistune.artifacts import save_artifact
from vistune.errors import VistuneError
from vistune.methods import METHODS, adapt, make_config

# small, fast settings; every other option is the method's default
SETTINGS = {
    "mlp": {"k": 2}, "partial": {"k": 1}, "adapter": {"reduction": 4},
    "vpt-shallow": {"num_tokens": 2}, "vpt-deep": {"num_tokens": 2},
    "pgn": {"num_prompts": 2, "library_size": 8, "generator_width": 4},
    "vpt-pad": {"width": 2},
    "sidetune": {"side_network": "mobilenetv2_050", "side_pretrained": False},
}


def methods_for(view) -> list[str]:
    """The methods that run on a backbone view (or view class); on a view, also those that do not refuse its
    model when built (e.g. peft's Linear-only methods on a CNN whose forward calls no Linear)."""
    names = sorted(n for n, i in METHODS.items() if i.supports(view))
    if isinstance(view, type):
        return names
    return [n for n in names if _builds(view, n)]


def _builds(backbone, method: str) -> bool:
    try:
        adapt(backbone, make_config(method, SETTINGS.get(method, {}), image_size=IMAGE_SIZE), 3)
    except VistuneError:
        return False
    return True


def perturbed(backbone, method: str, num_classes: int, seed: int, sets: dict | None = None):
    """An adapted model whose tuned tensors (parameters, and buffers of tuned modules: BN statistics, SCT's
    channels) are moved off their init; the frozen backbone's own tensors are never touched."""
    torch.manual_seed(seed)
    model = adapt(backbone, make_config(method, {**SETTINGS.get(method, {}), **(sets or {})},
                                        image_size=IMAGE_SIZE), num_classes).eval()
    frozen = {t.data_ptr() for t in [*backbone.model.parameters(), *backbone.model.buffers()]}
    with torch.no_grad():
        for key, t in model.tuned_state_dict().items():
            if t.data_ptr() in frozen:
                continue
            if key.endswith(".index"):  # SCT: other salient channels than the first K (K = D/8 by default)
                t.copy_(torch.randperm(2 * t.numel())[:t.numel()].sort().values)
            elif "running_var" in key:
                t.mul_(1 + 0.2 * torch.rand_like(t))
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    return model


def make_artifact(backbone, method: str, out: Path, *, num_classes: int = 3, seed: int = 0,
                  sets: dict | None = None, image_size: int = IMAGE_SIZE, keep: dict | None = None) -> Path:
    """Write the artifact to ``out``; ``keep``: a dict that gets ``keep[out] = the model`` (saves reloading it)."""
    model = perturbed(backbone, method, num_classes, seed, sets)
    if keep is not None:
        keep[out] = model
    preprocessing = {"image_size": image_size, "normalization": "pretrained_cfg", "augment": False,
                     "data_config": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                                     "interpolation": "bilinear", "input_size": [3, image_size, image_size]}}
    save_artifact(model, out, class_names=[f"{method}-{k}" for k in range(num_classes)], preprocessing=preprocessing)
    return out
