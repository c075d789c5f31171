"""Activation checkpointing (``--grad-checkpoint``): recompute each block's activations in the backward.

Each residual block of the method's copy of the model (``view.blocks()``, the family view's list: ViT and
Swin blocks, CNN blocks) runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved, so dropout
draws the same masks): the forward keeps only the block's input, and the backward recomputes the block before
it back-propagates through it. The last block is not checkpointed: its backward starts right after the forward,
so recomputing it would only cost time, and the peak (reached when the backward begins) is the same.

Why not timm's ``set_grad_checkpointing``: timm's CNN forwards flatten their stages into blocks
(``checkpoint_seq(..., flatten=True)``), which fails on a stage that a method has wrapped (Pro-tuning's and
SCT's CNN stages), and token tuners run the blocks themselves (``ViTView.forward_tokens``). Checkpointing the
view's blocks covers every family, wrapper and the token seam with one mechanism: the block's own ``forward``
is what runs under checkpoint, whoever calls it.

It is a runtime setting of training only: no tensor changes, the module tree is the same (the blocks' ``forward``
is wrapped on the instances while training and restored after), the caller's backbone stays bit-identical,
artifacts are the same, and the gradients equal those of the run that stores activations.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import VistuneError
from ..methods import Method


def _recomputed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to store or recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def activation_checkpointing(model: Method, enable: bool) -> Iterator[None]:
    """Within the block, ``model``'s backbone blocks recompute their activations in the backward (if ``enable``)."""
    if not enable:
        yield
        return
    blocks = model.backbone.blocks()[:-1]  # the last one's activations are used as soon as they are made
    if not blocks:
        raise VistuneError(f"--grad-checkpoint: backbone {model.backbone.spec.name!r} has fewer than two blocks "
                           "to checkpoint", "train without --grad-checkpoint")
    for block in blocks:
        block.forward = _recomputed(block.forward)  # an instance attribute: the class's forward stays
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def honours_grad_checkpoint(train: Callable) -> Callable:
    """``train(model, train_set, val_set, cfg, ...)`` run with ``cfg.grad_checkpoint`` applied to ``model``."""

    @functools.wraps(train)
    def wrapper(model, train_set, val_set, cfg, *args, **kwargs):
        with activation_checkpointing(model, cfg.grad_checkpoint):
            return train(model, train_set, val_set, cfg, *args, **kwargs)

    return wrapper
