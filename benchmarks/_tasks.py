"""Task artifacts for the multi-task benchmarks: adapted models with their tuned tensors moved off their init and
saved (no training: memory and speed do not depend on the trained values)."""
from __future__ import annotations

from pathlib import Path

import torch

from vistune.artifacts import save_artifact
from vistune.methods import adapt, make_config

SETTINGS = {"vpt-deep": {"num_tokens": 10}, "vpt-shallow": {"num_tokens": 10}, "adapter": {"reduction": 8},
            "mlp": {"k": 2}, "partial": {"k": 1},
            "sidetune": {"side_network": "mobilenetv2_050", "side_pretrained": False}}


def make_tasks(backbone, method: str, n: int, root: Path, image_size: int, num_classes: int = 10) -> list[Path]:
    """``n`` artifacts of ``method`` under ``root`` (reused when already there)."""
    frozen = {t.data_ptr() for t in [*backbone.model.parameters(), *backbone.model.buffers()]}
    dirs = []
    for i in range(n):
        out = root / f"{method}-{i}"
        dirs.append(out)
        if (out / "adapter.json").exists():
            continue
        torch.manual_seed(i)
        model = adapt(backbone, make_config(method, SETTINGS.get(method, {}), image_size=image_size), num_classes)
        with torch.no_grad():
            for t in model.tuned_state_dict().values():
                if t.is_floating_point() and t.data_ptr() not in frozen:
                    t.add_(torch.randn_like(t) * 0.02)
        cfg = backbone.model.pretrained_cfg
        prep = {"image_size": image_size, "normalization": "pretrained_cfg", "augment": False,
                "data_config": {"mean": list(cfg.get("mean", (0.5,) * 3)), "std": list(cfg.get("std", (0.5,) * 3)),
                                "interpolation": "bilinear", "input_size": [3, image_size, image_size]}}
        save_artifact(model.eval(), out, class_names=[f"class{k}" for k in range(num_classes)], preprocessing=prep)
    return dirs
