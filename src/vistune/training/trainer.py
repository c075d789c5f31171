"""The trainer: VPT's recipe by default, val-based selection, resumable checkpoints.

Recipe (VPT): SGD momentum 0.9, lr = base_lr × batch/256, linear warm-up then cosine stepped per
epoch, no weight decay on biases and norm parameters. AdamW is selectable (and is the default
of methods that set ``default_optimizer = "adamw"``, e.g. full fine-tuning).

Determinism: every epoch seeds its own shuffling and dropout from (seed, epoch), so a run that
is resumed from its last checkpoint computes exactly what the uninterrupted run computes.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._io import atomic_write
from ..errors import TrainingDiverged, VistuneError
from ..methods import Method

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # base lr; None → the optimizer's default below
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adamw"] | None = None  # None → the method's default (SGD for most)
    warmup_epochs: int | None = None  # None → 10% of epochs (VPT: 10 of 100)
    lr_scaling: bool = True  # lr × batch/256, as VPT
    label_smoothing: float = 0.0
    select: Literal["best-val", "last"] = "best-val"
    seed: int = 42
    device: str = "auto"
    amp: bool | None = None  # None → bf16 autocast on CUDA, fp32 on CPU (bf16 is slower on CPUs)
    num_workers: int = 0
    cache_inputs: bool = True  # keep decoded, transformed images in memory (only without augmentation)
    cache_features: bool = True  # head-only methods without augmentation: run the frozen backbone once

    DEFAULT_LR = {"sgd": 1.0, "adamw": 1e-3}

    def resolved_optimizer(self, model: Method) -> str:
        return self.optimizer or getattr(model, "default_optimizer", "sgd")

    def base_lr(self, model: Method) -> float:
        """--lr, else the method's own default (if it sets ``default_lr``), else the optimizer's."""
        if self.lr is not None:
            return self.lr
        return getattr(model, "default_lr", None) or self.DEFAULT_LR[self.resolved_optimizer(model)]

    def effective_lr(self, model: Method) -> float:
        return self.base_lr(model) * (self.batch_size / 256 if self.lr_scaling else 1.0)

    def warmup(self) -> int:
        return self.warmup_epochs if self.warmup_epochs is not None else max(0, round(0.1 * self.epochs))


@dataclass
class TrainResult:
    val_accuracy: float
    best_epoch: int
    epochs: int
    train_seconds: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VistuneError(
            f"--device {device} requested, but PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda})",
            "use --device cpu (or auto), or install a CUDA build of PyTorch on a machine with a GPU",
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise VistuneError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or auto")
    return torch.device(device)


class InMemory(Dataset):
    """Decodes and transforms every item once; for deterministic (non-augmented) pipelines."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.items: list | None = None
        self.labels = getattr(dataset, "labels", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.items is None:
            self.items = [None] * len(self.dataset)
        if self.items[i] is None:
            self.items[i] = self.dataset[i]
        return self.items[i]


class FeatureCache(Dataset):
    """(pooled frozen feature, label) pairs, computed once by the frozen backbone.

    Valid only when the trainable part sits entirely on top of a deterministic frozen feature
    (head-only methods, no random augmentation); training on it matches the uncached run.
    """

    def __init__(self, model: Method, dataset: Dataset, device: torch.device, batch_size: int,
                 amp: bool | None, progress: bool, desc: str):
        feats, labels = [], []
        model.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for x, y in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
                with _autocast(device, amp):
                    feats.append(model.features(x.to(device)).float())
                labels.append(y.to(device))
        self.features, self.targets = torch.cat(feats), torch.cat(labels)
        self.labels = self.targets.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.features[i], self.targets[i]


def _param_groups(model: Method, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    lr = cfg.effective_lr(model)
    if cfg.resolved_optimizer(model) == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def _lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the effective lr during ``epoch`` (0-based): linear warm-up, then cosine."""
    warm = cfg.warmup()
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    span = max(1, cfg.epochs - warm)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))


def _autocast(device: torch.device, amp: bool | None):
    use = (device.type == "cuda") if amp is None else amp
    if use and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if use and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, device="cpu",
             amp: bool | None = None, progress: bool = False, desc: str = "eval") -> dict:
    """Top-1 accuracy and mean loss of ``model`` on ``dataset``."""
    device = torch.device(device)
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


def train(model: Method, train_set: Dataset, val_set: Dataset, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          augment: bool = False, batch_transform=None) -> TrainResult:
    """Train ``model``'s tuned parameters; loads the best-val (or last) state into it at the end.

    ``batch_transform`` (e.g. random crops done on the GPU) is applied to each training batch on
    the device; it counts as augmentation. With ``out_dir``, a checkpoint is written there after every epoch; ``resume=True`` continues
    from it to the same result as an uninterrupted run.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    augment = augment or batch_transform is not None
    if cfg.cache_inputs and not augment:
        train_set, val_set = InMemory(train_set), InMemory(val_set)
    net: nn.Module = model  # what one training step runs
    if cfg.cache_features and not augment and getattr(model, "trains_head_only", False):
        bs = max(cfg.batch_size, 64)
        train_set = FeatureCache(model, train_set, device, bs, cfg.amp, progress, "features (train)")
        val_set = FeatureCache(model, val_set, device, bs, cfg.amp, progress, "features (val)")
        net = model.head
    if len(train_set) < cfg.batch_size:
        raise VistuneError(
            f"the training split has {len(train_set)} images, fewer than --batch-size {cfg.batch_size}",
            f"use --batch-size {max(2, len(train_set) // 2)} or more training data",
        )
    optimizer = _make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None

    start_epoch, best_val, best_epoch, best_state, history, elapsed = 0, -1.0, -1, None, [], 0.0
    if resume:
        if state_path is None or not state_path.is_file():
            raise VistuneError(
                f"--resume: no checkpoint {state_path} to resume from",
                "drop --resume to start a new run, or pass the --out folder of the interrupted run",
            )
        ckpt = torch.load(state_path, map_location=device, weights_only=True)
        if ckpt["config"] != _comparable(cfg):
            raise VistuneError(
                f"--resume: {state_path} was written with different training settings",
                "resume with the same options, or start a new --out folder",
            )
        model.load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["best_epoch"]
        best_state, history, elapsed = ckpt["best_state"], ckpt["history"], ckpt["elapsed"]

    steps_per_epoch = len(train_set) // cfg.batch_size  # drop_last: BatchNorm heads need batches > 1
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"train {model.info.name}", disable=None if progress else True, unit="step", dynamic_ncols=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: same per epoch with or without resume
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            generator=gen, num_workers=cfg.num_workers)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(epoch, cfg)
        model.train()
        loss_sum, seen = 0.0, 0
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if batch_transform is not None:
                x = batch_transform(x)
            with _autocast(device, cfg.amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(effective lr {optimizer.param_groups[0]['lr']:.4g})",
                    "lower --lr (e.g. by 10×), or use --optimizer adamw; check the data for broken images",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}")
        train_time = time.perf_counter() - t0
        val = evaluate(net, val_set, batch_size=max(cfg.batch_size, 64), device=device, amp=cfg.amp)
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "val_accuracy": val["accuracy"],
                        "val_loss": val["loss"], "lr": optimizer.param_groups[0]["lr"], "seconds": train_time})
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_sum / max(1, seen):.3f}",
                        val=f"{val['accuracy']:.3f}")
        if cfg.select == "last" or val["accuracy"] > best_val:
            best_val, best_epoch = val["accuracy"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.tuned_state_dict().items()}
        if state_path is not None:
            ckpt = {"epoch": epoch, "model": model.tuned_state_dict(), "optimizer": optimizer.state_dict(),
                    "best_val": best_val, "best_epoch": best_epoch, "best_state": best_state,
                    "history": history, "elapsed": elapsed, "config": _comparable(cfg)}
            atomic_write(state_path, lambda tmp: torch.save(ckpt, tmp))
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return TrainResult(val_accuracy=best_val, best_epoch=best_epoch, epochs=cfg.epochs,
                       train_seconds=elapsed, history=history)


def _comparable(cfg: TrainConfig) -> dict:
    """The settings that change the result (a resume must use the same ones)."""
    d = asdict(cfg)
    for k in ("device", "num_workers", "cache_inputs"):
        d.pop(k)
    return d
