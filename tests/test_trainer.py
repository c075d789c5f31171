"""The trainer through run_job: exact resume, divergence, device errors, val-only selection, and a
frozen backbone that stays bit-identical (tiny random backbones, tiny image folders: fast)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset

import vistune.training.trainer as trainer_mod
from conftest import IMAGE_SIZE, TINY, tiny_backbone
from vistune.artifacts import TENSORS, load_artifact
from vistune.data import load_data
from vistune.errors import VistuneError
from vistune.methods import adapt, make_config
from vistune.run import METRICS, Job, preprocessing_for, read_metrics, run_job, transforms_for
from vistune.training import TrainConfig, train
from vistune.training.trainer import STATE_FILE, resolve_device

CLASSES = ("ant", "bee", "cat")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def make_image_folder(root: Path, n_train: int = 8, n_test: int = 4, size: int = 24, seed: int = 0) -> Path:
    """root/{train,test}/<class>/<i>.png: noisy images whose colour tells the class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros(3)
                base[c] = 200
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img, "RGB").save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


def job(kind: str, method: str, data: Path, out: Path | None, overrides=None, **train) -> Job:
    arch, kwargs = TINY[kind]
    cfg = dict(epochs=4, batch_size=4, lr=0.5, device="cpu", seed=3)
    cfg.update(train)
    return Job(backbone=arch, method=method, data=str(data), out=None if out is None else str(out),
               overrides=overrides or {}, random_init=True, model_kwargs=kwargs, image_size=IMAGE_SIZE,
               train=TrainConfig(**cfg))


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method,overrides", [("adapter", {"reduction": 4}), ("mlp", {"k": 2}), ("linear", {})],
                         ids=["adapter", "mlp-2", "linear-feature-cache"])
def test_resume_after_interrupt_equals_uninterrupted_run(method, overrides, folder, tiny_backbones, tmp_path,
                                                         monkeypatch):
    backbone = tiny_backbones("vit")
    straight = run_job(job("vit", method, folder, tmp_path / "straight", overrides), backbone=backbone,
                       progress=False)

    interrupted_out = tmp_path / "interrupted"
    real_lr_factor = trainer_mod._lr_factor

    def interrupt_at_epoch_3(epoch, cfg):  # called at the start of every epoch (0-based)
        if epoch == 2:
            raise KeyboardInterrupt
        return real_lr_factor(epoch, cfg)

    monkeypatch.setattr(trainer_mod, "_lr_factor", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_job(job("vit", method, folder, interrupted_out, overrides), backbone=backbone, progress=False)
    monkeypatch.setattr(trainer_mod, "_lr_factor", real_lr_factor)
    assert (interrupted_out / STATE_FILE).is_file()
    assert not (interrupted_out / METRICS).exists() and not (interrupted_out / TENSORS).exists()
    assert torch.load(interrupted_out / STATE_FILE, weights_only=True)["epoch"] == 1  # epochs 1-2 done

    # a fresh start in that folder is refused: it would throw the interrupted run away
    with pytest.raises(VistuneError, match="interrupted run") as e:
        run_job(job("vit", method, folder, interrupted_out, overrides), backbone=backbone, progress=False)
    assert "--resume" in e.value.fix

    epochs_run = []

    def record(epoch, cfg):
        epochs_run.append(epoch)
        return real_lr_factor(epoch, cfg)

    monkeypatch.setattr(trainer_mod, "_lr_factor", record)
    resumed = run_job(job("vit", method, folder, interrupted_out, overrides), backbone=backbone, resume=True,
                      progress=False)
    assert sorted(set(epochs_run)) == [2, 3], "resume continues at epoch 3; it does not start over"

    # the same result, bit for bit
    a, b = straight["model"].tuned_state_dict(), resumed["model"].tuned_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    assert len(resumed["history"]) == 4
    for key in ("val_accuracy", "best_epoch", "test_accuracy", "tuned_params"):
        assert resumed[key] == straight[key], key
    ta, tb = load_file(str(tmp_path / "straight" / TENSORS)), load_file(str(interrupted_out / TENSORS))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert without_timing(read_metrics(interrupted_out)["history"]) == without_timing(straight["history"])


def interrupt_in_epoch_2(done: int, total: int, epochs: int) -> None:
    """An on_step callback's body: stop at the first step of epoch 2 (epoch 1's checkpoint is written)."""
    if done == total // epochs + 1:
        raise KeyboardInterrupt


def test_resume_refuses_other_settings_and_a_missing_checkpoint(folder, tiny_backbones, tmp_path):
    backbone = tiny_backbones("vit")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_job(job("vit", "linear", folder, out, epochs=2), backbone=backbone, progress=False,
                on_step=lambda done, total: interrupt_in_epoch_2(done, total, 2))
    state = (out / STATE_FILE).read_bytes()
    with pytest.raises(VistuneError, match="different job") as e:
        run_job(job("vit", "linear", folder, out, epochs=2, lr=0.1), backbone=backbone, resume=True,
                progress=False)
    assert "--lr: 0.5 → 0.1" in e.value.what and "interrupted run's settings" in e.value.fix
    assert (out / STATE_FILE).read_bytes() == state
    with pytest.raises(VistuneError, match="no checkpoint") as e:
        run_job(job("vit", "linear", folder, tmp_path / "empty", epochs=1), backbone=backbone, resume=True,
                progress=False)
    assert "drop --resume" in e.value.fix


# ------------------------------------------------------------------------------------------- divergence
def test_a_huge_lr_stops_with_a_clear_message(folder, tiny_backbones, tmp_path):
    with pytest.raises(VistuneError) as e:
        run_job(job("vit", "bias", folder, tmp_path / "out", lr=1e30), backbone=tiny_backbones("vit"),
                progress=False)
    assert "training diverged" in e.value.what and "epoch 1" in e.value.what
    assert "lower --lr" in e.value.fix
    assert not (tmp_path / "out" / METRICS).exists() and not (tmp_path / "out" / TENSORS).exists()


class _Tensors(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.labels = y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("method", ["linear", "adapter"])
def test_a_nan_image_stops_with_a_clear_message(method, tiny_backbones):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    x[5, :, 3, 3] = float("nan")
    y = torch.arange(12) % 3
    model = adapt(tiny_backbones("vit"), make_config(method), 3)
    with pytest.raises(VistuneError) as e:
        train(model, _Tensors(x, y), _Tensors(x, y), TrainConfig(epochs=1, batch_size=12, device="cpu"),
              progress=False)
    assert "loss became nan" in e.value.what and "broken images" in e.value.fix


# ------------------------------------------------------------------------------------------------ device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error_before_any_loading(folder, tiny_backbones):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(VistuneError) as e:
            resolve_device(device)
        assert "no CUDA GPU" in e.value.what and "--device cpu" in e.value.fix
    # run_job refuses before it loads the backbone (that name does not exist) or the data
    bad = Job(backbone="no-such-backbone", method="linear", data="/no/such/data", train=TrainConfig(device="cuda"))
    with pytest.raises(VistuneError, match="no CUDA GPU"):
        run_job(bad, progress=False)
    model = adapt(tiny_backbones("vit"), make_config("linear"), 3)
    with pytest.raises(VistuneError, match="no CUDA GPU"):
        train(model, [], [], TrainConfig(device="cuda"), progress=False)
    with pytest.raises(VistuneError, match="unknown device"):
        resolve_device("tpu")


def test_batch_size_larger_than_the_training_set(folder, tiny_backbones):
    with pytest.raises(VistuneError, match="fewer than --batch-size 64") as e:
        run_job(job("vit", "adapter", folder, None, batch_size=64), backbone=tiny_backbones("vit"),
                progress=False)
    assert "--batch-size" in e.value.fix


# ------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("select", ["best-val", "last"])
def test_selection_uses_val_only_and_keeps_the_selected_epoch(select, folder, tiny_backbones, tmp_path,
                                                              monkeypatch):
    backbone = tiny_backbones("vit")
    j = job("vit", "adapter", folder, tmp_path / "out", {"reduction": 4}, select=select)
    train_tf, eval_tf = transforms_for(preprocessing_for(backbone, j))
    data = load_data(str(folder), train_transform=train_tf, eval_transform=eval_tf, seed=3)
    scripted = iter([0.4, 0.9, 0.2, 0.6])  # epoch 2 is best on val
    snapshots, evaluated = [], []
    real_evaluate = trainer_mod.evaluate

    def scripted_evaluate(net, dataset, **kw):
        evaluated.append(dataset)
        res = real_evaluate(net, dataset, **kw)
        model = net  # the adapter trains the backbone path: net is the whole model
        snapshots.append({k: v.clone() for k, v in model.tuned_state_dict().items()})
        return {**res, "accuracy": next(scripted)}

    monkeypatch.setattr(trainer_mod, "evaluate", scripted_evaluate)
    metrics = run_job(j, backbone=backbone, data=data, progress=False)
    # during training only the val split was evaluated (the test split never influences selection)
    assert len(evaluated) == 4 and all(getattr(d, "dataset", None) is data.val for d in evaluated)
    keep = 1 if select == "best-val" else 3
    assert metrics["best_epoch"] == keep + 1
    assert metrics["val_accuracy"] == [0.4, 0.9, 0.2, 0.6][keep]
    kept = metrics["model"].tuned_state_dict()
    assert all(torch.equal(kept[k], snapshots[keep][k]) for k in kept)
    if select == "best-val":  # the epochs really differ, so this is not vacuous
        assert not all(torch.equal(kept[k], snapshots[3][k]) for k in kept)
    saved = load_file(str(tmp_path / "out" / TENSORS))
    assert all(torch.equal(saved[k], snapshots[keep][k]) for k in saved)
    assert metrics["test_accuracy"] is not None


# ------------------------------------------------------------------------------------- frozen backbone
@pytest.mark.parametrize("method,overrides", [("bias", {}), ("partial", {"k": 1}), ("adapter", {"reduction": 4}),
                                              ("full", {})])
def test_backbone_bit_identical_after_run_job(method, overrides, folder, tmp_path):
    backbone = tiny_backbone("resnet")  # BatchNorm: running statistics must not leak into it either
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    fingerprint = backbone.fingerprint()
    metrics = run_job(job("resnet", method, folder, tmp_path / "out", overrides, epochs=1, lr=0.1),
                      backbone=backbone, progress=False)
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{method} modified the caller's backbone: {changed[:5]}"
    backbone._fingerprint = None  # recompute from the tensors, not the cache
    assert backbone.fingerprint() == fingerprint == tiny_backbone("resnet").fingerprint()
    # ... while the method's own copy did train
    tuned = metrics["model"].backbone.model.state_dict()
    if method != "adapter":
        assert any(not torch.equal(before[k], tuned[k]) for k in before)
    # and the artifact reloads onto the untouched backbone to the same predictions
    model, _ = load_artifact(tmp_path / "out", backbone=backbone)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), metrics["model"].eval()(x))
