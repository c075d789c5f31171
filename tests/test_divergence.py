"""Finite divergence: a loss that explodes and a collapse to chance after a blow-up or a lasting rise stop with
TrainingDiverged, naming the epoch, the effective lr and a lower lr to try; a hard task, a slow start, a warm-up or
one bad epoch do not (DivergenceCheck in training/trainer.py). Rules on exact loss sequences, the trainer on tiny
models."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from conftest import IMAGE_SIZE
from vistune.errors import TrainingDiverged
from vistune.methods import adapt, make_config
from vistune.training import TrainConfig, train
from vistune.training.trainer import DivergenceCheck

BALANCED = [32.0] * 10  # one epoch of 320 training images over 10 classes
LN10 = 2.302585


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def check_after(losses: list[float], base_lr: float = 1.0, history: list[dict] | None = None) -> DivergenceCheck:
    check = DivergenceCheck(TrainConfig(batch_size=32), base_lr, history or [])
    check.start_epoch()
    for step, loss in enumerate(losses):
        check.step(loss, 0, step, base_lr * 32 / 256)
    return check


# ------------------------------------------------------------------------------------------ the rules
def test_an_exploding_finite_loss_stops_with_the_epoch_the_lr_and_a_lower_one():
    check = check_after([2.3, 20.0], base_lr=0.5)  # mean 11.2 < 23: one spike is not an explosion
    with pytest.raises(TrainingDiverged) as e:
        check.step(60.0, 0, 2, 0.0625)  # mean 27.4 > 10 × 2.3
    assert "loss exploded at epoch 1, step 3 (effective lr 0.0625)" in e.value.what
    assert "27.43" in e.value.what and "2.3" in e.value.what
    assert "--lr 0.05" in e.value.fix and "--lr auto" in e.value.fix


def test_a_collapse_to_chance_after_a_blow_up_stops_after_the_warm_up():
    check = check_after([LN10, 17.0, 2.31, 2.30])  # what a too-high lr did to pro-tuning (docs/defaults.md)
    check.epoch_end(0, 31.0, BALANCED, 2.31, 0.125, after_warmup=False)  # the first epoch is never judged
    with pytest.raises(TrainingDiverged) as e:
        check.epoch_end(1, 31.0, BALANCED, 2.31, 0.1067, after_warmup=True)
    assert "collapsed at epoch 2 (effective lr 0.1067)" in e.value.what
    assert "train accuracy 0.097" in e.value.what and "majority class 0.100" in e.value.what
    assert "blown up to 17" in e.value.what
    assert "--lr 0.1" in e.value.fix


def test_a_loss_that_rose_above_its_start_at_chance_stops_without_a_blow_up():
    """OFT at SGD 1.0 on the own ViT × digits: 2.5 → 3.4 → 3.6 per epoch, never 5× its start, val 0.115."""
    check = check_after([2.5, 3.0, 3.4])
    check.epoch_end(0, 31.0, BALANCED, 2.53, 0.1, after_warmup=False)
    check.epoch_end(1, 33.0, BALANCED, 3.41, 0.1, after_warmup=True)  # one bad epoch: a run may recover
    with pytest.raises(TrainingDiverged) as e:
        check.epoch_end(2, 33.0, BALANCED, 3.63, 0.1, after_warmup=True)
    assert "collapsed at epoch 3" in e.value.what
    assert "for two epochs it sat over 1.25× the first step's loss" in e.value.what
    assert "(the first step's: 2.5)" in e.value.what and "--lr" in e.value.fix


def test_a_resumed_run_remembers_the_epoch_before_from_its_history():
    history = [{"epoch": 1, "train_loss": 2.53, "start_loss": 2.5, "max_train_loss": 3.0},
               {"epoch": 2, "train_loss": 3.41, "max_train_loss": 3.6}]
    with pytest.raises(TrainingDiverged, match="collapsed at epoch 3"):
        check_after([3.6, 3.6], history=history).epoch_end(2, 33.0, BALANCED, 3.63, 0.1, after_warmup=True)


def test_one_bad_epoch_that_the_run_recovers_from_does_not_stop_it():
    """VPT-shallow's default on the own ViT × digits: 2.4, 3.2, 2.3, 1.5 per epoch, val 0.49."""
    check = check_after([2.4, 2.6])
    for epoch, (loss, correct) in enumerate([(2.38, 40.0), (3.22, 32.0), (2.26, 60.0), (1.51, 120.0)]):
        check.epoch_end(epoch, correct, BALANCED, loss, 0.1, after_warmup=epoch > 0)


def test_a_resumed_run_remembers_the_blow_up_from_its_history():
    history = [{"epoch": 1, "train_loss": 4.0, "start_loss": LN10, "max_train_loss": 17.0}]
    check = check_after([2.31, 2.30], history=history)
    with pytest.raises(TrainingDiverged, match="collapsed at epoch 2"):
        check.epoch_end(1, 31.0, BALANCED, 2.31, 0.1, after_warmup=True)


@pytest.mark.parametrize("case", ["never blew up (a slow start)", "a slow start from a high loss",
                                  "learning: above chance",
                                  "learning: the loss is below the class-frequency loss", "imbalanced majority"])
def test_no_false_alarm(case):
    if case == "never blew up (a slow start)":  # a tiny lr: at chance, the loss still ln K
        check_after([LN10, 2.30, 2.31]).epoch_end(3, 31.0, BALANCED, 2.30, 1e-6, after_warmup=True)
    elif case == "a slow start from a high loss":  # a head that starts overconfident: above ln K, but falling
        check_after([4.0, 3.9, 3.9]).epoch_end(1, 31.0, BALANCED, 3.85, 1e-5, after_warmup=True)
    elif case == "learning: above chance":  # 0.2 > 0.1 + 2 standard errors (0.034)
        check_after([LN10, 17.0, 2.2]).epoch_end(1, 64.0, BALANCED, 2.25, 0.1, after_warmup=True)
    elif case == "learning: the loss is below the class-frequency loss":
        check_after([LN10, 17.0, 1.8]).epoch_end(1, 34.0, BALANCED, 1.9, 0.1, after_warmup=True)
    else:  # 3 classes, 80% one class: predicting it everywhere is 0.8 "accuracy"; 0.9 is learning
        counts = [240.0, 30.0, 30.0]
        check_after([1.1, 8.0, 0.4]).epoch_end(1, 270.0, counts, 0.45, 0.1, after_warmup=True)


# ------------------------------------------------------------------------------------------ the trainer
class Tensors(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.labels = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def tinted(n: int, seed: int, random_labels: bool = False) -> Tensors:
    """3 classes of noise images whose class tints one channel (or labels that mean nothing)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    if random_labels:
        y = y[torch.randperm(n, generator=g)]
    else:
        x[torch.arange(n), y] += 1.5
    return Tensors(x, y)


def test_a_huge_but_finite_lr_stops_in_the_first_epoch(tiny_backbones):
    model = adapt(tiny_backbones("vit"), make_config("linear"), 3)
    with pytest.raises(TrainingDiverged) as e:
        train(model, tinted(48, 0), tinted(12, 1), TrainConfig(epochs=3, batch_size=8, lr=1e5, optimizer="sgd",
                                                             device="cpu"), progress=False)
    assert "loss exploded at epoch 1" in e.value.what
    assert "--lr 10000" in e.value.fix


@pytest.mark.parametrize("setting", ["random labels", "a tiny lr"])
def test_a_hard_task_or_a_slow_start_trains_to_the_end(setting, tiny_backbones):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config("adapter", {"reduction": 4}), 3)
    lr = 1e-7 if setting == "a tiny lr" else None
    result = train(model, tinted(48, 0, random_labels=setting == "random labels"), tinted(12, 1),
                   TrainConfig(epochs=4, batch_size=8, lr=lr, device="cpu"), progress=False)
    assert len(result.history) == 4
    assert all("train_accuracy" in h and h["max_train_loss"] >= h["train_loss"] for h in result.history)
    assert result.history[0]["start_loss"] > 0


# ------------------------------------------------------------------ losses read every N steps (the GPU path)
def _run(interval: int, monkeypatch, lr=None):
    monkeypatch.setattr("vistune.training.trainer.loss_read_interval", lambda device: interval)
    torch.manual_seed(0)
    from conftest import tiny_backbone
    model = adapt(tiny_backbone("vit"), make_config("adapter", {"reduction": 4}), 3)
    return train(model, tinted(48, 0), tinted(12, 1), TrainConfig(epochs=2, batch_size=8, lr=lr, device="cpu"),
                 progress=False)


def test_reading_the_losses_every_few_steps_changes_no_figure(monkeypatch):
    # on a GPU the losses are read every 50 steps (no host sync per step); 4 does not divide the 6 steps/epoch
    every_step, every_fourth = _run(1, monkeypatch), _run(4, monkeypatch)
    for a, b in zip(every_step.history, every_fourth.history, strict=True):
        for key in ("train_loss", "val_accuracy", "val_loss", "max_train_loss", "train_accuracy"):
            assert a[key] == b[key], key
    assert every_step.history[0]["start_loss"] == every_fourth.history[0]["start_loss"]


def test_a_divergence_read_late_still_names_the_step_where_it_happened(monkeypatch):
    messages = []
    for interval in (1, 5):
        with pytest.raises(TrainingDiverged) as e:
            _run(interval, monkeypatch, lr=1e5)
        messages.append(e.value.what)
    assert messages[0] == messages[1]
    assert "at epoch 1, step" in messages[0]
