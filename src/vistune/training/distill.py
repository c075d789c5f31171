"""Knowledge distillation as a training objective (:class:`Distillation`, for ``train(objective=...)``).

Loss of a batch of B items, L of which carry a label (unlabelled items have label :data:`UNLABELLED`)::

    loss = α · CE(student logits, labels)              mean over the L labelled items (0 when L = 0)
         + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T))  mean over all B items      (Hinton et al. 2015)
         + β · D(P · f_s, f_t)                             mean over all B items      (feature_loss mse/cosine)

``t``/``s`` are the teacher's/student's logits, ``f_t``/``f_s`` their pooled features (the input of each model's
head), ``P`` a learned linear projector from the student's feature width to the teacher's — FitNets' hint regressor
(Romero et al. 2015), here on the pooled feature rather than an intermediate map, so that it fits every family and
every method. D is the mean squared error or 1 − cosine similarity. The T² keeps the KD gradients' scale
independent of T (Hinton et al., §2). The CE is a mean over the labelled items only, so unlabelled images change
only the distillation terms and a batch's CE has the same scale whatever share of it is unlabelled.

The teacher is a frozen vistune model in eval mode. Without augmentation its outputs are the same every epoch, so
they are computed once per training item (:class:`TeacherOutputs`, as the trainer's feature cache does for the
frozen backbone) from the teacher's own preprocessing of the same item (``teacher_inputs``: a dataset aligned with
the training set by index). With augmentation each item carries the teacher's view of the same augmented image as
its third element and the teacher runs on every batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import VistuneError
from ..methods import Method
from ..methods.procedures import DistillConfig
from .objective import Objective
from .trainer import InMemory, _autocast

UNLABELLED = -1  # the label of an item that contributes only the distillation terms


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float, label_smoothing: float = 0.0,
                      projected: torch.Tensor | None = None, teacher_features: torch.Tensor | None = None,
                      feature_loss: str = "none", feature_weight: float = 1.0) -> torch.Tensor:
    """The loss of the module docstring for one batch (float32)."""
    s, t = student_logits.float(), teacher_logits.float()
    labelled = labels != UNLABELLED
    loss = s.new_zeros(())
    if alpha > 0 and bool(labelled.any()):
        loss = loss + alpha * F.cross_entropy(s[labelled], labels[labelled], label_smoothing=label_smoothing)
    if alpha < 1:
        kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                      log_target=True, reduction="batchmean")
        loss = loss + (1 - alpha) * temperature ** 2 * kl
    if feature_loss != "none":
        p, f = projected.float(), teacher_features.float()
        distance = F.mse_loss(p, f) if feature_loss == "mse" else (1 - F.cosine_similarity(p, f, dim=1)).mean()
        loss = loss + feature_weight * distance
    return loss


def logits_and_features(model: nn.Module, head: nn.Module, x: torch.Tensor, want_features: bool):
    """``model(x)`` and, when wanted, the pooled feature its ``head`` read (the head's input: the same tensor
    whether ``model`` is a whole Method or its head on cached features)."""
    if not want_features:
        return model(x), None
    seen = []
    handle = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[-1]


@dataclass
class TeacherOutputs(Dataset):
    """The training set's items with the teacher's cached outputs: ``(x, y, teacher logits[, teacher feature])``."""

    items: Dataset
    logits: torch.Tensor
    features: torch.Tensor | None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i][:2]
        return (x, y, self.logits[i]) if self.features is None else (x, y, self.logits[i], self.features[i])


@dataclass
class WithTeacherInputs(Dataset):
    """The training set's items with the teacher's input of the same item: ``(x, y, teacher x)``."""

    items: Dataset
    teacher_inputs: Dataset

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i][:2]
        return x, y, self.teacher_inputs[i][0]


class DistillStep(nn.Module):
    """One step's forward: the student (``net``, through which DDP's gradients flow), the projector, and the frozen
    teacher — held outside the module tree, so DDP neither broadcasts nor reduces it and ``train()`` leaves it in
    eval mode. Returns (student logits, teacher logits, projected student feature, teacher feature)."""

    def __init__(self, net: nn.Module, head: nn.Module, teacher: Method, projector: nn.Module | None,
                 cached: bool):
        super().__init__()
        self.net, self.projector = net, projector
        self._frozen = (head, teacher)  # a tuple: not registered as submodules
        self.cached = cached

    def forward(self, x: torch.Tensor, *extras: torch.Tensor):
        head, teacher = self._frozen
        features = self.projector is not None
        if self.cached:
            t_logits, t_features = extras[0], (extras[1] if features else None)
        else:
            with torch.no_grad():
                t_logits, t_features = logits_and_features(teacher, teacher.head, extras[0], features)
        s_logits, s_features = logits_and_features(self.net, head, x, features)
        projected = self.projector(s_features.float()) if features else None
        return s_logits, t_logits, projected, t_features


class Distillation(Objective):
    """Knowledge distillation from a frozen ``teacher`` (a classification :class:`~vistune.methods.Method`).

    ``teacher_inputs``: a dataset aligned with the training set by index whose item i is the teacher's input for
    training item i (the same image under the teacher's preprocessing), or None when every training item carries
    it as its third element (augmented pairs). ``student_dim``/``teacher_dim``: pooled feature widths (the
    projector's, with a feature loss). ``identity``: what names the teacher (e.g. its files' hashes); a checkpoint
    keeps it with the settings, and resuming with another teacher or other settings is refused."""

    def __init__(self, teacher: Method, config: DistillConfig, *, student_dim: int, teacher_dim: int,
                 teacher_inputs: Dataset | None, label_smoothing: float = 0.0, identity: dict | None = None):
        if teacher.task != "classification":
            raise VistuneError("the teacher is a segmentation model; distillation needs a classifier",
                               "pass the --out folder of a classification run as --teacher")
        self.teacher, self.config, self.teacher_inputs = teacher.eval(), config, teacher_inputs
        self.label_smoothing = label_smoothing
        self.identity = {"settings": config.to_dict(), "teacher": identity or {}}
        self.cached = config.cache_teacher and teacher_inputs is not None
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.trainable = None
        if config.feature_loss != "none":
            self.trainable = nn.Linear(student_dim, teacher_dim)  # FitNets' regressor on pooled features

    def state_dict(self) -> dict:
        return {**super().state_dict(), "identity": self.identity}

    def load_state_dict(self, state: dict) -> None:
        if state.get("identity") != self.identity:
            raise VistuneError("--resume: the checkpoint was written with another teacher or other distillation "
                               "settings", "resume with the same --teacher and settings, or start a new --out folder")
        super().load_state_dict(state)

    @property
    def wants_features(self) -> bool:
        return self.trainable is not None

    def training_set(self, train_set: Dataset, *, cfg, device: torch.device, progress: bool) -> Dataset:
        self.teacher.to(device)
        if self.trainable is not None:
            self.trainable.to(device)
        if self.teacher_inputs is None:
            return train_set  # items (x, y, teacher x) of the same augmented image
        if len(self.teacher_inputs) != len(train_set):
            raise ValueError(f"teacher_inputs has {len(self.teacher_inputs)} items, the training set {len(train_set)}")
        if not self.cached:
            inputs = InMemory(self.teacher_inputs) if cfg.cache_inputs else self.teacher_inputs
            return WithTeacherInputs(train_set, inputs)
        logits, features = self.teacher_pass(self.teacher_inputs, device=device, batch_size=max(cfg.batch_size, 64),
                                             amp=cfg.amp, progress=progress)
        return TeacherOutputs(train_set, logits, features)

    @torch.no_grad()
    def teacher_pass(self, dataset: Dataset, *, device, batch_size: int, amp, progress: bool):
        """The teacher's logits (and pooled features, with a feature loss) of every item, once, in order."""
        logits, features = [], []
        for x, _ in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc="teacher (train)",
                         disable=None if progress else True, leave=False):
            with _autocast(device, amp):
                t, f = logits_and_features(self.teacher, self.teacher.head, x.to(device), self.wants_features)
            logits.append(t.float())
            if f is not None:
                features.append(f.float())
        return torch.cat(logits), (torch.cat(features) if features else None)

    def step_module(self, model: Method, net: nn.Module) -> nn.Module:
        return DistillStep(net, model.head, self.teacher, self.trainable, self.cached)

    def logits(self, output) -> torch.Tensor:
        return output[0]  # the student's

    def loss(self, output, y: torch.Tensor) -> torch.Tensor:
        s_logits, t_logits, projected, t_features = output
        c = self.config
        return distillation_loss(s_logits, t_logits, y, temperature=c.temperature, alpha=c.alpha,
                                 label_smoothing=self.label_smoothing, projected=projected,
                                 teacher_features=t_features, feature_loss=c.feature_loss,
                                 feature_weight=c.feature_weight)
