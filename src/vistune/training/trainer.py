"""The trainer: VPT's recipe by default, val-based selection, resumable checkpoints.

Recipe (VPT): SGD momentum 0.9, lr = base_lr × batch/256, linear warm-up then cosine stepped per
epoch, no weight decay on biases and norm parameters. AdamW is selectable. A method's own defaults come from
its class (the Method contract, methods/base.py): ``default_optimizer``, ``default_lrs``,
``default_warmup_fraction``.

Determinism: every epoch seeds its own shuffling and dropout from (seed, epoch), so a run that
is resumed from its last checkpoint computes exactly what the uninterrupted run computes.

Data parallel (torchrun, see :mod:`.distributed`): every epoch draws one global permutation of the
training set (DistributedSampler, seeded by (seed, epoch)); global batch k is its items k·B … k·B+B-1 in
one process, and the same items split over N processes (B/N each, DDP averaging the gradients) under
torchrun, so both compute the same steps up to float rounding.
"""
from __future__ import annotations


import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .._io import atomic_write
from ..data.segmentation import IGNORE_INDEX
from ..errors import TrainingDiverged, VistuneError
from ..methods import Method
from . import distributed
from .metrics import confusion_matrix, scores_from_confusion
from .objective import CrossEntropy, Objective

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # base lr; None → the method's default_lrs, else the optimizer's default below
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adamw"] | None = None  # None → the method's default (SGD for most)
    warmup_epochs: int | None = None  # None → the method's default_warmup_fraction of the epochs (VPT: 10%)
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
        return self.optimizer or model.default_optimizer

    def base_lr(self, model: Method) -> float:
        """--lr, else the method's own default for the optimizer (``default_lrs``), else the optimizer's."""
        if self.lr is not None:
            return self.lr
        optimizer = self.resolved_optimizer(model)
        return model.default_lrs.get(optimizer, self.DEFAULT_LR[optimizer])

    def effective_lr(self, model: Method) -> float:
        return self.base_lr(model) * (self.batch_size / 256 if self.lr_scaling else 1.0)

    def warmup(self, model: Method | None = None) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        fraction = model.default_warmup_fraction if model is not None else Method.default_warmup_fraction
        return max(0, round(fraction * self.epochs))


@dataclass
class TrainResult:
    val_accuracy: float
    best_epoch: int
    epochs: int
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    val_miou: float | None = None  # segmentation: the selected epoch's val mIoU (the selection metric)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """The torch device of ``--device``; under torchrun a bare ``cuda`` is this process's own GPU."""
    if device == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VistuneError(
            f"--device {device} requested, but PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda})",
            "use --device cpu (or auto), or install a CUDA build of PyTorch on a machine with a GPU",
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise VistuneError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or auto")
    return distributed.local_device(torch.device(device))


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


def _param_groups(model: Method, weight_decay: float, extra: nn.Module | None = None):
    decay, no_decay = [], []
    named = [*model.named_parameters(), *(extra.named_parameters() if extra is not None else [])]
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model: Method, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD/AdamW over the model's trainable parameters and ``extra``'s (an objective's own trainable part)."""
    groups = _param_groups(model, cfg.weight_decay, extra)
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
    """Top-1 accuracy and mean loss of ``model`` on ``dataset``.

    Segmentation (the model returns (B, K, H, W) logits, items carry (H, W) masks, 255 = ignore): a K×K
    confusion matrix gives ``miou`` (mean IoU over the classes present in the ground truth or the
    prediction), ``pixel_accuracy`` (also returned as ``accuracy``), per-class ``iou``, the mean per-pixel
    ``loss`` and ``n`` images.

    Under torchrun each process evaluates every N-th item and the counts are summed, so every process
    gets the accuracy of the whole dataset (and selects the same epoch)."""
    device = torch.device(device)
    model.eval()
    segmentation = getattr(model, "task", "classification") == "segmentation"
    if distributed.active():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct, total, loss_sum = 0, 0, 0.0
    conf, images = None, 0  # segmentation: confusion matrix (rows = truth) and image count
    for x, y in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            logits = model(x)
        if segmentation:
            loss_sum += nn.functional.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX,
                                                    reduction="sum").item()
            c = confusion_matrix(logits.argmax(1), y, logits.shape[1])
            conf = c if conf is None else conf + c
            images += len(y)
            continue
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    if segmentation:
        return _segmentation_scores(model, conf, images, loss_sum, device)
    correct, total, loss_sum = distributed.sum_across([correct, total, loss_sum], device)
    correct, total = int(correct), int(total)
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


def _segmentation_scores(model, conf, images: int, loss_sum: float, device) -> dict:
    """Sum the confusion matrix, loss and counts over processes (all-reduce), then mIoU / pixel accuracy."""
    k = conf.shape[0] if conf is not None else model.num_classes  # a process that got no items
    flat = conf.flatten().tolist() if conf is not None else [0] * (k * k)
    summed = distributed.sum_across([*flat, float(images), loss_sum], device)
    conf = torch.tensor(summed[:k * k], dtype=torch.float64).reshape(k, k)
    pixels = float(conf.sum())
    scores = scores_from_confusion(conf)
    return {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"], "accuracy": scores["pixel_accuracy"],
            "iou": scores["iou"], "loss": summed[-1] / max(1.0, pixels), "n": int(summed[-2])}


def train(model: Method, train_set: Dataset, val_set: Dataset, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          augment: bool = False, batch_transform=None,
          on_step: Callable[[int, int], None] | None = None, objective: Objective | None = None) -> TrainResult:
    """Train ``model``'s tuned parameters; loads the best-val (or last) state into it at the end.

    ``batch_transform`` (e.g. random crops done on the GPU) is applied to each training batch on
    the device; it counts as augmentation. With ``out_dir``, a checkpoint is written there after every epoch; ``resume=True`` continues
    from it to the same result as an uninterrupted run. ``on_step(done, total)`` is called after every
    training step (e.g. a caller's own progress bar: `vistune bench` shows one per run). ``objective``: what a
    step minimises and what its items carry (:mod:`.objective`; default: cross-entropy with the labels).
    """
    device = resolve_device(cfg.device)
    world, rank = distributed.world_size(), distributed.rank()
    if cfg.batch_size % world:
        raise VistuneError(
            f"--batch-size {cfg.batch_size} cannot be split evenly over the {world} processes torchrun started",
            f"use a multiple of {world} (each process takes batch-size/{world} images of every batch)",
        )
    progress = progress and distributed.is_main()
    model.to(device)
    augment = augment or batch_transform is not None
    if cfg.cache_inputs and not augment:
        train_set, val_set = InMemory(train_set), InMemory(val_set)
    net: nn.Module = model  # what one training step runs
    segmentation = model.task == "segmentation"
    if cfg.cache_features and not augment and model.trains_head_only:
        bs = max(cfg.batch_size, 64)
        train_set = FeatureCache(model, train_set, device, bs, cfg.amp, progress, "features (train)")
        val_set = FeatureCache(model, val_set, device, bs, cfg.amp, progress, "features (val)")
        net = model.head
    objective = objective or CrossEntropy(cfg.label_smoothing, segmentation)
    train_set = objective.training_set(train_set, cfg=cfg, device=device, progress=progress)
    if len(train_set) < cfg.batch_size:
        raise VistuneError(
            f"the training split has {len(train_set)} images, fewer than --batch-size {cfg.batch_size}",
            f"use --batch-size {max(2, len(train_set) // 2)} or more training data",
        )
    # one process: net itself; under torchrun: DDP around it, averaging gradients over the processes.
    # Buffers (BatchNorm running statistics) are not broadcast each step but averaged after each epoch.
    step_module = objective.step_module(model, net)
    step_net = step_module if world == 1 else DistributedDataParallel(
        step_module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    optimizer = _make_optimizer(model, cfg, objective.trainable)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    schedule = dataclasses.replace(cfg, warmup_epochs=cfg.warmup(model))  # the method's default warm-up resolved
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
        objective.load_state_dict(ckpt.get("objective", {}))
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["best_epoch"]
        best_state, history, elapsed = ckpt["best_state"], ckpt["history"], ckpt["elapsed"]

    steps_per_epoch = len(train_set) // cfg.batch_size  # drop_last: BatchNorm heads need batches > 1
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"train {model.info.name}", disable=None if progress else True, unit="step", dynamic_ncols=True)
    select_on = "miou" if segmentation else "accuracy"  # segmentation selects on val mIoU
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: same per epoch with or without resume
        # the epoch's permutation is randperm(seed·1000 + epoch); rank r takes its items r, r+N, r+2N, …,
        # so the r-th slice of B/N items of every process's batch k together are global batch k
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.seed * 1000, drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * _lr_factor(epoch, schedule)
        model.train()
        step_net.train()  # the DDP wrapper's own mode flag (in one process: net again, a no-op)
        loss_sum, seen = 0.0, 0
        for step, (x, y, *extras) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extras = [e.to(device, non_blocking=True) for e in extras]  # what the objective's items carry
            if batch_transform is not None:
                x = batch_transform(x)
            with _autocast(device, cfg.amp):
                output = step_net(x, *extras)
            loss = objective.loss(output, y)
            # the global batch's loss (equal shares: the mean of the processes' means); every process
            # sees the same value, so a divergence stops all of them at the same step
            batch_loss = distributed.sum_across([loss.item()], device)[0] / world
            if not math.isfinite(batch_loss):
                raise TrainingDiverged(
                    f"training diverged: the loss became {batch_loss} at epoch {epoch + 1}, step {step + 1} "
                    f"(effective lr {optimizer.param_groups[0]['lr']:.4g})",
                    "lower --lr (e.g. by 10×), or use --optimizer adamw; check the data for broken images",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += batch_loss * len(y) * world
            seen += len(y) * world
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{batch_loss:.3f}")
            if on_step is not None:
                on_step(epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch)
        # each process updated train-mode BatchNorm statistics on its own B/N images: agree on their mean
        if world > 1:
            distributed.average_across(_tuned_buffers(model))
        train_time = time.perf_counter() - t0
        val = evaluate(net, val_set, batch_size=max(cfg.batch_size, 64), device=device, amp=cfg.amp)
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "val_accuracy": val["accuracy"],
                        "val_loss": val["loss"], "lr": optimizer.param_groups[0]["lr"], "seconds": train_time,
                        **({"val_miou": val["miou"]} if segmentation else {})})
        bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_sum / max(1, seen):.3f}",
                        val=f"{val['accuracy']:.3f}")
        if cfg.select == "last" or val[select_on] > best_val:
            best_val, best_epoch = val[select_on], epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.tuned_state_dict().items()}
        if state_path is not None and distributed.is_main():
            ckpt = {"epoch": epoch, "model": model.tuned_state_dict(), "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "best_val": best_val, "best_epoch": best_epoch, "best_state": best_state,
                    "history": history, "elapsed": elapsed, "config": _comparable(cfg)}
            atomic_write(state_path, lambda tmp: torch.save(ckpt, tmp))
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    # the selected epoch's val scores (segmentation: selected on mIoU; its accuracy is the pixel accuracy)
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    return TrainResult(val_accuracy=best.get("val_accuracy", best_val), best_epoch=best_epoch, epochs=cfg.epochs,
                       train_seconds=elapsed, history=history, val_miou=best.get("val_miou"))


def _tuned_buffers(model: Method) -> list[torch.Tensor]:
    """The method's own buffers (e.g. running statistics of a BatchNorm that trains), never frozen ones."""
    parameters = {name for name, _ in model.named_parameters()}
    return [v for k, v in model.tuned_state_dict().items() if k not in parameters]


def _comparable(cfg: TrainConfig) -> dict:
    """The settings that change the result (a resume must use the same ones)."""
    d = asdict(cfg)
    for k in ("device", "num_workers", "cache_inputs"):
        d.pop(k)
    return d
