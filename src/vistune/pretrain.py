"""Pretraining vistune's own small ViT and Swin from scratch (``vistune pretrain``).

No transformer weights can be downloaded offline, so vistune makes its own: a stock timm ViT and a
stock timm Swin, shrunk for 32×32 inputs, trained on CIFAR-10 with vistune's trainer (method
``full`` on a random-init backbone). The recipe for small data: random crop (4 px reflect padding)
and horizontal flip done on the device, label smoothing 0.1, AdamW (wd 0.05), linear warm-up then
cosine. The result is a safetensors file plus a model card (JSON) that ``load_backbone`` reads.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from ._io import atomic_write, atomic_write_json, sha256_file
from .backbones import load_backbone
from .errors import VistuneError, suggest
from .methods import adapt, make_config
from .training import TrainConfig, evaluate, train
from .training.trainer import resolve_device

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str
    model_kwargs: dict
    description: str
    epochs: int = 100
    batch_size: int = 512
    lr: float = 2e-3  # effective lr (no batch scaling)
    weight_decay: float = 0.05
    warmup_epochs: int = 10
    label_smoothing: float = 0.1
    image_size: int = 32
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    extra_card: dict = field(default_factory=dict)


RECIPES = {
    r.name: r
    for r in [
        Recipe(
            name="vistune/vit-tiny-cifar10",
            architecture="vit_small_patch16_224",
            model_kwargs=dict(img_size=32, patch_size=4, embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0),
            description="ViT (patch 4, 6 blocks, D=256, 64 patch tokens + CLS) pretrained on CIFAR-10 by vistune",
        ),
        Recipe(
            name="vistune/swin-tiny-cifar10",
            architecture="swin_tiny_patch4_window7_224",
            model_kwargs=dict(img_size=32, patch_size=2, window_size=4, embed_dim=64, depths=(2, 2, 3),
                              num_heads=(2, 4, 8)),
            description="Swin (patch 2, window 4, 3 stages D=64/128/256) pretrained on CIFAR-10 by vistune",
        ),
    ]
}


def random_crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop after reflect padding, and random horizontal flip, on any device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _stack(dataset) -> TensorDataset:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


def pretrain(recipe_name: str, data: str, out_dir: str | Path, *, epochs: int | None = None,
             device: str = "auto", progress: bool = True, seed: int = 0, on_epoch=None) -> dict:
    """Train a recipe's backbone from scratch; writes ``<slug>.safetensors`` + ``<slug>.json``. ``on_epoch``:
    the trainer's per-epoch callback (the CLI prints a line per epoch where no progress bar shows)."""
    from torchvision import transforms

    from .data import load_data

    if recipe_name not in RECIPES:
        raise VistuneError(f"unknown pretraining recipe {recipe_name!r}.{suggest(recipe_name, RECIPES)}",
                           f"choose one of {', '.join(RECIPES)}")
    r = RECIPES[recipe_name]
    epochs = epochs or r.epochs
    dev = resolve_device(device)
    tf = transforms.Compose([transforms.Resize((r.image_size, r.image_size)), transforms.ToTensor(),
                             transforms.Normalize(r.mean, r.std)])
    splits = load_data(data, train_transform=tf, eval_transform=tf, seed=seed, val_fraction=0.02)
    if splits.test is None:
        raise VistuneError(f"{data} has no test split", "pretraining reports test top-1: give data with a test split")
    train_set, val_set, test_set = _stack(splits.train), _stack(splits.val), _stack(splits.test)
    view = load_backbone(r.architecture, random_init=True, model_kwargs=r.model_kwargs)
    torch.manual_seed(seed)
    model = adapt(view, make_config("full"), num_classes=len(splits.class_names))
    cfg = TrainConfig(epochs=epochs, batch_size=r.batch_size, lr=r.lr, lr_scaling=False, optimizer="adamw",
                      weight_decay=r.weight_decay, warmup_epochs=r.warmup_epochs,
                      label_smoothing=r.label_smoothing, seed=seed, device=str(dev), cache_inputs=False)
    t0 = time.perf_counter()
    result = train(model, train_set, val_set, cfg, progress=progress, batch_transform=random_crop_flip,
                   on_epoch=on_epoch)
    wall = time.perf_counter() - t0
    test = evaluate(model, test_set, batch_size=1024, device=dev)
    slug = r.name.split("/", 1)[1]
    out = Path(out_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.backbone.model.state_dict().items()}
    atomic_write(out / f"{slug}.safetensors", lambda tmp: save_file(weights, tmp))
    digest = sha256_file(out / f"{slug}.safetensors")
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'x86-64'})"
    card = {
        "name": r.name,
        "architecture": r.architecture,
        "model_kwargs": r.model_kwargs,
        "pretrained_cfg": {"input_size": [3, r.image_size, r.image_size], "mean": list(r.mean),
                           "std": list(r.std), "interpolation": "bilinear", "crop_pct": 1.0},
        "description": r.description,
        "weights": f"{slug}.safetensors",
        "sha256": digest,
        "params": sum(v.numel() for v in weights.values() if v.is_floating_point()),
        "data": f"{data}: {splits.summary()}",
        "command": f"vistune pretrain {r.name} --data {data} --epochs {epochs} --seed {seed}",
        "recipe": {"epochs": epochs, "batch_size": r.batch_size, "optimizer": "adamw", "lr": r.lr,
                   "weight_decay": r.weight_decay, "warmup_epochs": r.warmup_epochs,
                   "label_smoothing": r.label_smoothing, "augmentation": "random crop (pad 4, reflect) + flip",
                   "schedule": "linear warm-up, cosine per epoch", "selection": "best val epoch (2% of train)"},
        "wall_seconds": round(wall, 1),
        "hardware": hardware,
        "val_top1": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "test_top1": test["accuracy"],
        "torch": torch.__version__,
    }
    atomic_write_json(out / f"{slug}.json", card)
    return card
