"""The trainer: VPT's schedule with each method's measured defaults, val-based selection, resumable checkpoints.

Recipe (VPT's): lr = base_lr × batch/256, linear warm-up then cosine stepped per epoch, no weight decay on
biases and norm parameters; SGD momentum 0.9 or AdamW (most methods default to AdamW). A method's own defaults come from
its class (the Method contract, methods/base.py): ``default_optimizer``, ``default_lrs``,
``default_warmup_fraction`` (docs/defaults.md measures them). The warm-up is that fraction of the run in whole
epochs (VPT); a run too short for one whole warm-up epoch (fewer than 5 epochs at 10%) warms up over that
fraction of its *steps* instead, so short runs get a warm-up too. ``lr="auto"`` picks the base lr by a short
val-based search first (:mod:`.lr_search`).

Divergence stops the run with :class:`~vistune.errors.TrainingDiverged` (a failed setting in a sweep): a
non-finite loss, a loss that explodes (the mean of the last steps > 10× the loss of the first step), or a
collapse — after the warm-up, a whole epoch at chance train accuracy with a loss no better than predicting the
class frequencies, after the loss had blown up (see :class:`DivergenceCheck`).

Determinism: every epoch seeds its own shuffling and dropout from (seed, epoch), so a run that
is resumed from its last checkpoint computes exactly what the uninterrupted run computes.

Data parallel (torchrun, see :mod:`.distributed`): every epoch draws one global permutation of the
training set (DistributedSampler, seeded by (seed, epoch)); global batch k is its items k·B … k·B+B-1 in
one process, and the same items split over N processes (B/N each, DDP averaging the gradients) under
torchrun, so both compute the same steps up to float rounding.
"""
from __future__ import annotations


import contextlib
import dataclasses
import json
import math
import time
import warnings
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

from .._io import atomic_write, atomic_write_json
from ..data.segmentation import IGNORE_INDEX
from ..errors import TrainingDiverged, VistuneError
from ..methods import Method
from . import distributed, lr_search
from .lr_search import LrSearch
from .metrics import confusion_matrix, scores_from_confusion
from .objective import CrossEntropy, Objective
from .recompute import honours_grad_checkpoint

STATE_FILE = "train_state.pt"
# what every checkpoint holds besides its job identity
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "best_val", "best_epoch", "best_state", "history", "elapsed")

# the TrainConfig fields `vistune train` has an option for (--batch-size for batch_size), and the exceptions
_FLAG_NAMES = {"num_workers": "--workers"}
_FLAGGED = {"epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "label_smoothing", "select",
            "seed", "device", "amp", "num_workers"}


def _flag(name: str) -> str:
    """How a user names a TrainConfig field: its `vistune train` option, else the field."""
    if name in _FLAGGED:
        return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    return f"TrainConfig.{name}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refuse(name: str, value, need: str, fix: str):
    flag = _flag(name)
    where = "" if flag.startswith("TrainConfig") else f" (TrainConfig.{name})"
    raise VistuneError(f"{flag} {value!r}{where} must be {need}", fix)


def _whole(value, name: str, minimum: int | None, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _refuse(name, value, "a whole number" + ("" if minimum is None else f" ≥ {minimum}"), fix)
    if minimum is not None and value < minimum:
        _refuse(name, value, f"≥ {minimum}", fix)


def _number(value, name: str, ok: bool, need: str, fix: str) -> None:
    if not ok:
        _refuse(name, value, ("a finite number " + need) if not _is_number(value) else need, fix)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float | Literal["auto"] | None = None  # base lr; None → the method's default_lrs, else the optimizer's
    # default below; "auto" → a short val-based search around that default (training/lr_search.py)
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
    grad_checkpoint: bool = False  # recompute block activations in the backward (less memory, more time; see .recompute)

    DEFAULT_LR = {"sgd": 1.0, "adamw": 1e-3}

    def __post_init__(self) -> None:
        """Every field checked once, when the config is built, so no invalid config reaches the trainer."""
        _whole(self.epochs, "epochs", 1, "train for at least one epoch, e.g. --epochs 10")
        _whole(self.batch_size, "batch_size", 1, "e.g. --batch-size 32")
        if self.lr is not None and self.lr != "auto":
            _number(self.lr, "lr", _is_number(self.lr) and self.lr > 0, "> 0 (or 'auto')",
                    "e.g. --lr 0.1, --lr auto, or leave it out for the method's default")
        _number(self.weight_decay, "weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, "≥ 0",
                "e.g. --weight-decay 0.0001 (0: none)")
        if self.optimizer not in (None, *self.DEFAULT_LR):
            _refuse("optimizer", self.optimizer, f"one of {', '.join(self.DEFAULT_LR)}",
                    "use --optimizer sgd or adamw, or leave it out for the method's default")
        if self.warmup_epochs is not None:
            _whole(self.warmup_epochs, "warmup_epochs", 0, "e.g. --warmup-epochs 1 (0: none)")
        _number(self.label_smoothing, "label_smoothing",
                _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "in [0, 1)",
                "e.g. --label-smoothing 0.1 (0: none)")
        if self.select not in ("best-val", "last"):
            _refuse("select", self.select, "best-val or last", "use --select best-val or --select last")
        _whole(self.seed, "seed", None, "e.g. --seed 42")
        if not isinstance(self.device, str):
            _refuse("device", self.device, "a string", "use cpu, cuda, cuda:N or auto")
        _whole(self.num_workers, "num_workers", 0, "e.g. --workers 4 (0: load in the main process)")
        for name in ("lr_scaling", "cache_inputs", "cache_features", "grad_checkpoint"):
            if not isinstance(getattr(self, name), bool):
                _refuse(name, getattr(self, name), "True or False", f"pass {name}=True or {name}=False")
        if self.amp is not None and not isinstance(self.amp, bool):
            _refuse("amp", self.amp, "True, False or None", "use --amp, --no-amp, or leave it out")

    def resolved_optimizer(self, model: Method) -> str:
        return self.optimizer or model.default_optimizer

    def default_lr(self, model: Method | type[Method], family: str | None = None) -> float:
        """The method's own base lr for the optimizer on the backbone's family (``default_lrs_by_family``, else
        ``default_lrs``), else the optimizer's. ``family`` defaults to an adapted model's own backbone's."""
        optimizer = self.resolved_optimizer(model)
        if family is None and isinstance(model, Method):
            family = model.backbone.family
        own = model.default_lr_for(optimizer, family)
        return own if own is not None else self.DEFAULT_LR[optimizer]

    def base_lr(self, model: Method) -> float:
        """--lr, else :meth:`default_lr`; ``"auto"`` must have been resolved (``train`` does) before."""
        if self.lr == "auto":
            raise ValueError("lr='auto' is resolved by train(); ask its TrainResult for the lr it chose")
        return self.lr if self.lr is not None else self.default_lr(model)

    def effective_lr(self, model: Method) -> float:
        return self.effective_lr_of(self.base_lr(model))

    def effective_lr_of(self, base_lr: float) -> float:
        return base_lr * (self.batch_size / 256 if self.lr_scaling else 1.0)

    def warmup(self, model: Method | None = None) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return max(0, round(self._warmup_fraction(model) * self.epochs))

    def warmup_steps(self, model: Method | None, steps_per_epoch: int) -> int:
        """Steps of the per-step warm-up of a run too short for a whole warm-up epoch: the method's warm-up
        fraction of all its steps (0 when --warmup-epochs is given or the warm-up is at least one epoch)."""
        if self.warmup_epochs is not None or self.warmup(model) > 0:
            return 0
        return round(self._warmup_fraction(model) * self.epochs * steps_per_epoch)

    @staticmethod
    def _warmup_fraction(model: Method | None) -> float:
        return model.default_warmup_fraction if model is not None else Method.default_warmup_fraction


@dataclass
class TrainResult:
    val_accuracy: float
    best_epoch: int
    epochs: int
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    val_miou: float | None = None  # segmentation: the selected epoch's val mIoU (the selection metric)
    # seconds of this call's phases: decode (the images' first decode + transform, kept in memory),
    # feature_cache (the frozen backbone run once), train (the steps), val (the per-epoch val eval)
    timings: dict = field(default_factory=dict)
    base_lr: float | None = None  # the base lr trained with (--lr auto: the one the search chose)
    effective_lr: float | None = None  # base_lr × batch/256 (with lr scaling): the peak lr of the schedule
    lr_search: dict | None = None  # --lr auto: the candidates, their val scores and the choice (LrSearch.to_dict)

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
        self.decode_seconds = 0.0  # spent decoding and transforming (each item once)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.items is None:
            self.items = [None] * len(self.dataset)
        if self.items[i] is None:
            t0 = time.perf_counter()
            self.items[i] = self.dataset[i]
            self.decode_seconds += time.perf_counter() - t0
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


def _warmup_ramp(global_step: int, warmup_steps: int) -> float:
    """Multiplier of the lr at ``global_step`` (0-based) of a per-step warm-up: linear, then 1."""
    return (global_step + 1) / (warmup_steps + 1) if global_step < warmup_steps else 1.0


def _lower_lr_fix(cfg: TrainConfig, base_lr: float) -> str:
    lower = float(f"{base_lr / 10:.3g}")
    scaling = " (× batch/256)" if cfg.lr_scaling else ""
    return (f"lower --lr: e.g. --lr {lower:g}, a tenth of this run's base lr {base_lr:g}{scaling}, or let --lr auto "
            "search one")


CUDA_LOSS_READ_INTERVAL = 50  # steps between host reads of the losses on a GPU


def loss_read_interval(device: torch.device) -> int:
    """Steps between host reads of the training losses: every step on a CPU, where a read costs nothing;
    every :data:`CUDA_LOSS_READ_INTERVAL` steps (and at each epoch's end) on a GPU, where each read (``.item()``)
    makes the host wait until the GPU has finished the queued work, so the next steps are not queued meanwhile."""
    return CUDA_LOSS_READ_INTERVAL if device.type == "cuda" else 1


class PendingLosses:
    """Training losses kept on the device until :meth:`read`: one transfer and, under torchrun, one all-reduce for
    all of them. The values read are the global batches' losses (equal shares: the mean of the processes' means);
    every process reads the same values at the same steps, so a divergence stops all of them at the same step,
    and the check sees the steps one by one in order, so it names the step where the loss went wrong."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.where: list[tuple[int, int, float, int]] = []  # (epoch, step, lr, items) of each loss

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, epoch: int, step: int, lr: float, items: int) -> None:
        self.losses.append(loss.detach().float())
        self.where.append((epoch, step, lr, items))

    def read(self) -> list[tuple[float, tuple[int, int, float, int]]]:
        if not self.losses:
            return []
        values = torch.stack(self.losses).double()
        distributed.average_across([values])  # in place, on the device
        read = list(zip(values.tolist(), self.where))
        self.losses, self.where = [], []
        return read


class DivergenceCheck:
    """Stops a run whose loss went non-finite, exploded, or collapsed to chance after blowing up.

    - *explosion*: the mean loss of the epoch's last ``WINDOW`` steps exceeds ``EXPLODE`` × the loss of the run's
      first step (the model before any update; ~ln K for a fresh head) — a loss that high never comes back to a
      useful model, and a sweep's too-high lrs stop within a few steps;
    - *collapse*: a whole epoch after the warm-up (and not the first epoch) whose train accuracy is at chance (at
      most the majority-class rate plus max(0.02, two binomial standard errors)) *and* whose loss is no better than
      predicting the class frequencies (≥ ``PRIOR_LOSS`` × their entropy), in a run whose loss had blown up
      (some step above ``BLOWUP`` × the first step's loss) or whose loss sat over ``ROSE`` × the first step's
      for this epoch and the one before — what a too-high lr leaves behind: dead features, one predicted class,
      loss ln K or worse (OFT at SGD 1.0 on the own ViT × digits went 2.5, 3.4, 3.6, 3.6 and ended at val 0.115,
      docs/defaults.md). Those conditions keep a run that has merely not started learning yet (a tiny lr, a
      genuinely hard task: its loss stays where it started) from being called diverged, and one bad epoch that a
      run recovers from (VPT-shallow's default on the same task: 2.4, 3.2, 2.3, 1.5, val 0.49) from stopping it.

    Everything it needs survives a resume in the epoch history (``start_loss`` in the first entry,
    ``max_train_loss`` and ``train_loss`` in each), so a resumed run stops exactly where the uninterrupted one does; the window
    restarts every epoch for the same reason. Under torchrun every process sees the same (all-reduced) losses and
    counts, so all of them stop at the same step."""

    EXPLODE = 10.0
    WINDOW = 10
    BLOWUP = 5.0
    ROSE = 1.25
    PRIOR_LOSS = 0.9

    def __init__(self, cfg: TrainConfig, base_lr: float, history: list[dict]):
        self.cfg, self.base_lr = cfg, base_lr
        self.start_loss: float | None = history[0].get("start_loss", history[0]["train_loss"]) if history else None
        self.peak_loss = max((h.get("max_train_loss", h["train_loss"]) for h in history), default=-math.inf)
        self.previous_epoch_loss: float | None = history[-1]["train_loss"] if history else None
        self.start_epoch()

    def start_epoch(self) -> None:
        self.recent: list[float] = []
        self.epoch_peak = -math.inf

    def step(self, loss: float, epoch: int, step: int, lr: float) -> None:
        where = f"at epoch {epoch + 1}, step {step + 1} (effective lr {lr:.4g})"
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss became {loss} {where}",
                                   _lower_lr_fix(self.cfg, self.base_lr) + "; check the data for broken images")
        if self.start_loss is None:
            self.start_loss = loss
        self.peak_loss, self.epoch_peak = max(self.peak_loss, loss), max(self.epoch_peak, loss)
        self.recent = (self.recent + [loss])[-self.WINDOW:]
        mean = sum(self.recent) / len(self.recent)
        if mean > self.EXPLODE * self.start_loss:
            recent = "the loss" if len(self.recent) == 1 else f"the mean loss of the last {len(self.recent)} steps"
            raise TrainingDiverged(
                f"training diverged: the loss exploded {where}: {recent} is {mean:.4g}, over {self.EXPLODE:g}× "
                f"the first step's {self.start_loss:.4g}",
                _lower_lr_fix(self.cfg, self.base_lr))

    def epoch_end(self, epoch: int, correct: float, label_counts: list[float], mean_loss: float, lr: float,
                  after_warmup: bool) -> None:
        """``correct`` / ``label_counts``: the epoch's training predictions (all processes) by class."""
        previous, self.previous_epoch_loss = self.previous_epoch_loss, mean_loss
        seen = sum(label_counts)
        if not after_warmup or seen == 0 or self.start_loss is None:
            return
        chance = max(label_counts) / seen
        margin = max(0.02, 2 * math.sqrt(chance * (1 - chance) / seen))
        prior = -sum(c / seen * math.log(c / seen) for c in label_counts if c > 0)
        accuracy = correct / seen
        blew_up = self.peak_loss > self.BLOWUP * self.start_loss
        rose = previous is not None and min(mean_loss, previous) > self.ROSE * self.start_loss
        if accuracy <= chance + margin and mean_loss >= self.PRIOR_LOSS * prior and (blew_up or rose):
            after = (f"after the loss had blown up to {self.peak_loss:.4g}" if blew_up else
                     f"and for two epochs it sat over {self.ROSE:g}× the first step's loss")
            raise TrainingDiverged(
                f"training collapsed at epoch {epoch + 1} (effective lr {lr:.4g}): train accuracy {accuracy:.3f} over "
                f"the whole epoch is at chance (majority class {chance:.3f}) and the loss {mean_loss:.4g} is no "
                f"better than predicting the class frequencies ({prior:.4g}), {after} (the first step's: "
                f"{self.start_loss:.4g})", _lower_lr_fix(self.cfg, self.base_lr))


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VistuneError(f"--batch-size {batch_size!r} must be a whole number ≥ 1", "e.g. --batch-size 64")
    device = torch.device(device)
    model.eval()
    segmentation = getattr(model, "task", "classification") == "segmentation"
    if distributed.active():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    # counts and the loss sum stay on the device until the end: a read per batch would make the host wait
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total, conf, images = 0, None, 0  # segmentation: confusion matrix (rows = truth) and image count
    for x, y in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        if segmentation:
            loss_sum += nn.functional.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX,
                                                    reduction="sum").double()
            c = confusion_matrix(logits.argmax(1), y, logits.shape[1])
            conf = c if conf is None else conf + c
            images += len(y)
            continue
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    if segmentation:
        return _segmentation_scores(model, conf, images, float(loss_sum), device)
    correct, total, loss_sum = distributed.sum_across([int(correct), total, float(loss_sum)], device)
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


@honours_grad_checkpoint
def train(model: Method, train_set: Dataset, val_set: Dataset, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          augment: bool = False, batch_transform=None,
          on_step: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict, int], None] | None = None, job_identity: dict | None = None,
          notify: Callable[[str], None] | None = None, objective: Objective | None = None) -> TrainResult:
    """Train ``model``'s tuned parameters; loads the best-val (or last) state into it at the end.

    ``batch_transform`` (e.g. random crops done on the GPU) is applied to each training batch on
    the device; it counts as augmentation. With ``out_dir``, a checkpoint is written there after every epoch;
    ``resume=True`` continues from it to the same result as an uninterrupted run. The checkpoint records the
    job's identity — ``job_identity`` (``{label: value}``: method, data, preprocessing, backbone, …, see
    :func:`vistune.run.job_identity`) and the training settings — and a resume whose identity differs in any
    field is refused before any work, naming each field that differs. ``on_step(done, total)`` is called after
    every training step (e.g. a caller's own progress bar: `vistune bench` shows one per run); ``on_epoch(record,
    epochs)`` after every epoch with its history record (the CLI's line per epoch where no bar shows).
    ``notify(line)`` hears what ``lr="auto"`` tried and chose. ``objective``: what a step minimises and what
    its items carry (:mod:`.objective`; default: cross-entropy with the labels).
    """
    device = resolve_device(cfg.device)
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    identity = {**(job_identity or {}), **train_identity(cfg)}
    ckpt = _checkpoint_to_resume(state_path, identity, device) if resume else None
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
    phases = _Phases([train_set, val_set])
    net: nn.Module = model  # what one training step runs
    segmentation = model.task == "segmentation"
    if cfg.cache_features and not augment and model.trains_head_only:
        bs = max(cfg.batch_size, 64)
        with phases("feature_cache"):
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
    steps_per_epoch = len(train_set) // cfg.batch_size  # drop_last: BatchNorm heads need batches > 1
    search = None
    run_cfg = cfg  # cfg with lr="auto" resolved; cfg itself (as the user gave it) is what a resume must match
    if cfg.lr == "auto":
        if not isinstance(objective, CrossEntropy):
            raise VistuneError(f"--lr auto searches with the cross-entropy loss, not {type(objective).__name__}",
                               "give the lr (--lr), e.g. the one `vistune train --lr auto` chose for this method")
        # segmentation: per-pixel cross-entropy over (B, K, H, W) logits, mask value 255 ignored
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing,
                                      ignore_index=IGNORE_INDEX if segmentation else -100)
        search = _auto_lr(model, net, step_net, train_set, val_set, cfg, device, loss_fn, out_dir, resume, notify)
        run_cfg = dataclasses.replace(cfg, lr=search.chosen)
    base_lr = run_cfg.base_lr(model)
    optimizer = _make_optimizer(model, run_cfg, objective.trainable)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    schedule = dataclasses.replace(run_cfg, warmup_epochs=run_cfg.warmup(model))  # the method's warm-up resolved
    warmup_steps = run_cfg.warmup_steps(model, steps_per_epoch)  # a run too short for a whole warm-up epoch

    start_epoch, best_val, best_epoch, best_state, history, elapsed = 0, -1.0, -1, None, [], 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"], strict=False)
            objective.load_state_dict(ckpt.get("objective", {}))
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise _corrupt(state_path, f"its tensors do not fit the model ({type(e).__name__})") from None
        start_epoch, best_val, best_epoch = ckpt["epoch"] + 1, ckpt["best_val"], ckpt["best_epoch"]
        best_state, history, elapsed = ckpt["best_state"], ckpt["history"], ckpt["elapsed"]

    check = DivergenceCheck(run_cfg, base_lr, history)
    pending, read_every = PendingLosses(), loss_read_interval(device)

    def read_losses(loss_sum: float, seen: int) -> tuple[float, int]:
        """Check the pending steps' losses in order; the epoch's loss sum and item count with them added."""
        value = None
        for value, (at_epoch, at_step, lr, items) in pending.read():
            check.step(value, at_epoch, at_step, lr)
            loss_sum, seen = loss_sum + value * items * world, seen + items * world
        if value is not None:
            bar.set_postfix(epoch=f"{at_epoch + 1}/{cfg.epochs}", loss=f"{value:.3f}")
        return loss_sum, seen

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
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        epoch_lrs = [lr * _lr_factor(epoch, schedule) for lr in base_lrs]
        for g, lr in zip(optimizer.param_groups, epoch_lrs):
            g["lr"] = lr
        model.train()
        step_net.train()  # the DDP wrapper's own mode flag (in one process: net again, a no-op)
        loss_sum, seen = 0.0, 0
        steps_started = phases.start()
        correct = torch.zeros((), dtype=torch.long, device=device)
        label_counts = torch.zeros(model.num_classes, dtype=torch.long, device=device)
        check.start_epoch()
        for step, (x, y, *extras) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            extras = [e.to(device, non_blocking=True) for e in extras]  # what the objective's items carry
            if batch_transform is not None:
                x = batch_transform(x)
            if warmup_steps:
                ramp = _warmup_ramp(epoch * steps_per_epoch + step, warmup_steps)
                for g, lr in zip(optimizer.param_groups, epoch_lrs):
                    g["lr"] = lr * ramp
            with _autocast(device, cfg.amp):
                output = step_net(x, *extras)
            loss = objective.loss(output, y)
            pending.add(loss, epoch, step, optimizer.param_groups[0]["lr"], len(y))
            if len(pending) >= read_every:  # checked before this step's update, as every step on a CPU
                loss_sum, seen = read_losses(loss_sum, seen)
            if not segmentation:  # labelled items only (distillation's unlabelled images have label -1)
                labelled = y >= 0  # masks, not boolean indexing: that would make the host wait for the GPU
                predicted = objective.logits(output).detach().argmax(1)
                correct += ((predicted == y) & labelled).sum()
                label_counts.scatter_add_(0, y.clamp(min=0), labelled.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if on_step is not None:
                on_step(epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch)
        loss_sum, seen = read_losses(loss_sum, seen)
        train_loss = loss_sum / max(1, seen)
        train_accuracy = None
        if not segmentation:  # the collapse check (per-pixel "chance" is mostly background: not judged)
            counts = distributed.sum_across(torch.cat([correct[None], label_counts]).tolist(), device)
            train_accuracy = counts[0] / max(1.0, sum(counts[1:]))
            check.epoch_end(epoch, counts[0], counts[1:], train_loss, optimizer.param_groups[0]["lr"],
                            after_warmup=epoch >= max(1, schedule.warmup_epochs))
        # each process updated train-mode BatchNorm statistics on its own B/N images: agree on their mean
        if world > 1:
            distributed.average_across(_tuned_buffers(model))
        phases.stop("train", steps_started)
        train_time = time.perf_counter() - t0
        with phases("val"):
            val = evaluate(net, val_set, batch_size=max(cfg.batch_size, 64), device=device, amp=cfg.amp)
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val["accuracy"],
                        "val_loss": val["loss"], "lr": optimizer.param_groups[0]["lr"], "seconds": train_time,
                        "max_train_loss": check.epoch_peak,
                        **({"start_loss": check.start_loss} if epoch == 0 else {}),
                        **({"train_accuracy": train_accuracy} if train_accuracy is not None else {}),
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
                    "history": history, "elapsed": elapsed, "identity": identity}
            try:
                atomic_write(state_path, lambda tmp: torch.save(ckpt, tmp))
            except VistuneError as e:  # out of disk space: the previous epoch's checkpoint is intact
                then = (f"then continue this run with --resume (from epoch {epoch}, the last one saved)" if epoch
                        else "then run it again (no epoch had been saved yet)")
                raise VistuneError(e.what, f"{e.fix}; {then}") from None
        if on_epoch is not None:
            on_epoch(history[-1], cfg.epochs)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    # the selected epoch's val scores (segmentation: selected on mIoU; its accuracy is the pixel accuracy)
    best = next((h for h in history if h["epoch"] == best_epoch), {})
    return TrainResult(val_accuracy=best.get("val_accuracy", best_val), best_epoch=best_epoch, epochs=cfg.epochs,
                       train_seconds=elapsed, history=history, val_miou=best.get("val_miou"), base_lr=base_lr,
                       effective_lr=run_cfg.effective_lr(model),
                       lr_search=None if search is None else search.to_dict(), timings=phases.seconds)


class _Phases:
    """Seconds per phase of :func:`train`; an image decoded for the first time inside a phase (by an
    :class:`InMemory`) counts as ``decode``, not as that phase."""

    def __init__(self, datasets: list):
        self.caches = [d for d in datasets if isinstance(d, InMemory)]
        self.seconds = {"decode": 0.0} if self.caches else {}

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), sum(c.decode_seconds for c in self.caches)

    def stop(self, name: str, started: tuple[float, float]) -> None:
        t0, d0 = started
        decoded = sum(c.decode_seconds for c in self.caches) - d0
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0 - decoded
        if self.caches:
            self.seconds["decode"] += decoded

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = self.start()
        yield
        self.stop(name, started)


LR_SEARCH_FILE = "lr_search.json"


def _auto_lr(model: Method, net: nn.Module, step_net: nn.Module, train_set: Dataset, val_set: Dataset,
             cfg: TrainConfig, device: torch.device, loss_fn: nn.Module, out_dir, resume: bool,
             notify: Callable[[str], None] | None) -> LrSearch:
    """``lr="auto"``: search the base lr (training/lr_search.py) from the model's initial state and restore that
    state. The result is written to OUT/lr_search.json, so a resumed run reuses it instead of searching again
    (which would search a model already restored from its checkpoint, e.g. an SCT without its calibration)."""
    saved = Path(out_dir) / LR_SEARCH_FILE if out_dir is not None else None
    if resume and saved is not None and saved.is_file():
        found = LrSearch.from_dict(json.loads(saved.read_text()))
        if notify is not None:
            notify(f"--lr auto: resuming with the base lr {found.chosen:.4g} chosen before ({saved})")
        return found
    initial = {k: v.clone() for k, v in model.tuned_state_dict().items()}
    steps = max(1, min(lr_search.PROBE_STEPS, cfg.epochs * (len(train_set) // cfg.batch_size)))
    n_val = min(len(val_set), lr_search.PROBE_VAL_IMAGES)
    val_probe = Subset(val_set, [round(i * len(val_set) / n_val) for i in range(n_val)])  # spread over the split
    world, rank = distributed.world_size(), distributed.rank()

    def probe(base_lr: float) -> tuple[float, float]:
        model.load_state_dict(initial, strict=False)
        probe_cfg = dataclasses.replace(cfg, lr=base_lr)
        optimizer = _make_optimizer(model, probe_cfg)
        check = DivergenceCheck(probe_cfg, base_lr, [])
        check.start_epoch()
        torch.manual_seed(cfg.seed * 1000 - 1)  # the same shuffling and dropout for every candidate
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed * 1000 - 1,
                                     drop_last=True)
        loader = DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers)
        model.train()
        step_net.train()
        done = 0
        while done < steps:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with _autocast(device, cfg.amp):
                    logits = step_net(x)
                loss = loss_fn(logits.float(), y)
                try:
                    check.step(distributed.sum_across([loss.item()], device)[0] / world, 0, done,
                               probe_cfg.effective_lr_of(base_lr))
                except TrainingDiverged as e:
                    raise lr_search.ProbeDiverged(e.what) from None
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
            sampler.set_epoch(sampler.epoch + 1)
        val = evaluate(net, val_probe, batch_size=max(cfg.batch_size, 64), device=device, amp=cfg.amp)
        return val["accuracy"], val["loss"]

    try:
        found = lr_search.search(cfg.default_lr(model), probe, optimizer=cfg.resolved_optimizer(model), steps=steps,
                                 val_images=n_val)
    finally:
        model.load_state_dict(initial, strict=False)
    if notify is not None:
        for line in found.lines():
            notify(line)
    if saved is not None and distributed.is_main():
        atomic_write_json(saved, found.to_dict())
    return found


def _tuned_buffers(model: Method) -> list[torch.Tensor]:
    """The method's own buffers (e.g. running statistics of a BatchNorm that trains), never frozen ones."""
    parameters = {name for name, _ in model.named_parameters()}
    return [v for k, v in model.tuned_state_dict().items() if k not in parameters]


def train_identity(cfg: TrainConfig) -> dict:
    """The training settings that change the result, as ``{label: value}`` (a resume must use the same ones)."""
    runtime = ("device", "num_workers", "cache_inputs", "grad_checkpoint")
    return {_flag(k): v for k, v in asdict(cfg).items() if k not in runtime}


_MISSING = "(not recorded)"  # a field one of the two identities lacks


def _corrupt(path: Path, why: str) -> VistuneError:
    return VistuneError(f"checkpoint {path} is corrupt: {why}",
                        "delete it or use a new --out folder (the interrupted run cannot be continued from it)")


def _checkpoint_to_resume(path: Path | None, identity: dict, device: torch.device) -> dict:
    """The checkpoint at ``path``, read and checked against this job's ``identity`` before any work."""
    if path is None or not path.is_file():
        raise VistuneError(
            f"--resume: no checkpoint {path} to resume from",
            "drop --resume to start a new run, or pass the --out folder of the interrupted run",
        )
    try:
        with warnings.catch_warnings():  # torch's warnings about a damaged file's pickle protocol: said below
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise VistuneError(f"cannot read checkpoint {path}: {e.strerror or e}",
                           "check the file's permissions, or use a new --out folder") from None
    except Exception as e:  # torch raises many types for a damaged file; never unpickled beyond weights_only
        raise _corrupt(path, f"torch cannot read it ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        raise _corrupt(path, "it is not a vistune training checkpoint")
    stored = ckpt.get("identity")
    if not isinstance(stored, dict):
        raise VistuneError(f"--resume: {path} does not record which job wrote it (an earlier vistune), so "
                           "continuing it could mix two jobs", "start the run again in a new --out folder")
    changed = [k for k in dict.fromkeys([*stored, *identity]) if stored.get(k, _MISSING) != identity.get(k, _MISSING)]
    if changed:
        lines = "".join(f"\n  {k}: {_shown(stored.get(k, _MISSING))} → {_shown(identity.get(k, _MISSING))}"
                        for k in changed)
        raise VistuneError(
            f"--resume: {path} was written by a different job ({len(changed)} setting(s) differ, was → now):{lines}",
            "resume with the interrupted run's settings (the values before →), or run this job in a new --out "
            f"folder (or delete {path.parent} if the interrupted run is no longer needed)",
        )
    return ckpt


def _shown(value) -> str:
    """A value as the user reads it: text and numbers in full (two paths may differ in their last letter),
    long lists and dicts (class names, data configs) cut short."""
    text = value if value is _MISSING else repr(value)
    return text if isinstance(value, str) or len(text) <= 120 else text[:117] + "…"
