"""The objective of a training run: what one step minimises, and what each training item carries for it.

:func:`~vistune.training.train` takes ``objective=``; the default, :class:`CrossEntropy`, is the trainer's own
loss (label smoothing, the segmentation ignore index). Another objective — knowledge distillation
(:mod:`vistune.training.distill`) — changes three things and nothing else in the loop:

1. :meth:`Objective.training_set` — the items a step gets. The trainer hands it its training set after the input and
   feature caches (same items, same order) and iterates what it returns: ``(x, y, *extras)``, e.g. a teacher's
   cached logits per item. ``x`` and ``y`` stay what the trainer expects (the student's input, the label).
2. :meth:`Objective.step_module` — the module one step runs, ``forward(x, *extras) -> output``; under torchrun the
   trainer wraps *this* module in DistributedDataParallel, so the objective's own trainable part
   (:attr:`Objective.trainable`, e.g. a feature projector) is called inside DDP's forward and its gradients are
   averaged over the processes like the model's.
3. :meth:`Objective.loss` — ``output, y -> scalar loss``.

:attr:`Objective.trainable`'s parameters train with the model's (same optimizer, lr and schedule) and are saved in
the trainer's checkpoint (:meth:`state_dict`), so a resumed run continues them; they are not part of the model
and so not of its artifact.
"""
from __future__ import annotations

import abc

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.segmentation import IGNORE_INDEX
from ..methods import Method


class Objective(abc.ABC):
    """What a training step minimises. Subclasses override what they change; the defaults are the trainer's."""

    trainable: nn.Module | None = None  # the objective's own trainable part (not part of the model's artifact)

    def training_set(self, train_set: Dataset, *, cfg, device: torch.device, progress: bool) -> Dataset:
        """The training items of a step, ``(x, y, *extras)``, from the trainer's training set (``cfg``: the
        :class:`~vistune.training.TrainConfig`). Default: the training set itself."""
        return train_set

    def step_module(self, model: Method, net: nn.Module) -> nn.Module:
        """The module a step runs: ``forward(x, *extras)``. ``net`` is what the trainer would run itself — the
        model, or its head on cached features. Default: ``net``."""
        return net

    @abc.abstractmethod
    def loss(self, output, y: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a step from the step module's ``output`` and the labels ``y``."""

    def logits(self, output) -> torch.Tensor:
        """The model's class logits in a step's ``output`` (the trainer's train-accuracy check reads them)."""
        return output

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the objective (its trainable part)."""
        return {} if self.trainable is None else {"trainable": self.trainable.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.trainable is not None and "trainable" in state:
            self.trainable.load_state_dict(state["trainable"])


class CrossEntropy(Objective):
    """The default objective: cross-entropy with the labels (per pixel for segmentation, mask value 255 ignored)."""

    def __init__(self, label_smoothing: float = 0.0, segmentation: bool = False):
        self.fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing,
                                      ignore_index=IGNORE_INDEX if segmentation else -100)

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(output.float(), y)
