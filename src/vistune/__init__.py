"""vistune: parameter-efficient adaptation of frozen pretrained vision models.

The top-level API (each name is imported on first use, so ``import vistune`` stays light)::

    import vistune
    backbone = vistune.load_backbone("vistune/vit-tiny-cifar10")       # any timm name; offline ones too
    model = vistune.adapt(backbone, vistune.make_config("lora", {"r": 4}), num_classes=10)
    result = vistune.train(model, train_set, val_set, vistune.TrainConfig(epochs=5))
    vistune.evaluate(model, test_set)
    vistune.save_artifact(model, "runs/lora", class_names=..., preprocessing=...)
    model, meta = vistune.load_artifact("runs/lora")
    metrics = vistune.run_job(vistune.Job(backbone=..., method=..., data=..., out=...))   # all of it, as the CLI
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_backbone": "vistune.backbones",
    "adapt": "vistune.methods",
    "make_config": "vistune.methods",
    "count_parameters": "vistune.methods",
    "METHODS": "vistune.methods",
    "train": "vistune.training",
    "evaluate": "vistune.training",
    "TrainConfig": "vistune.training",
    "save_artifact": "vistune.artifacts",
    "load_artifact": "vistune.artifacts",
    "load_data": "vistune.data",
    "run_job": "vistune.run",
    "prepare_job": "vistune.run",
    "Job": "vistune.run",
    "VistuneError": "vistune.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vistune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
