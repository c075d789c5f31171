"""Every bad input is a clear VistuneError (what, where, fix) before any work: TrainConfig and Job check their own
fields (the Python API is protected, not only the CLI), input sizes a backbone cannot take, method options that
would size absurd tensors, and a job whose memory need the machine does not have."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vistune.run as run_mod
from conftest import IMAGE_SIZE, TINY, tinted_class_folder
from vistune.backbones import load_backbone
from vistune.backbones.input_size import check_input_size
from vistune.errors import VistuneError
from vistune.methods import make_config
from vistune.run import Job, check_memory, prepare_job, preprocessing_for, run_job
from vistune.training import TrainConfig, evaluate


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tinted_class_folder(tmp_path_factory.mktemp("data") / "d", n_train=6, n_test=1, seed=0)


def refusal(make) -> VistuneError:
    with pytest.raises(VistuneError) as e:
        make()
    assert e.value.what and e.value.fix, "every refusal says what is wrong and how to fix it"
    return e.value


# -------------------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("field,value,expect", [
    ("epochs", 0, "--epochs 0 (TrainConfig.epochs) must be ≥ 1"),
    ("epochs", -3, "--epochs -3"),
    ("epochs", 2.5, "must be a whole number"),
    ("batch_size", 0, "--batch-size 0 (TrainConfig.batch_size) must be ≥ 1"),
    ("batch_size", -8, "--batch-size -8"),
    ("lr", -0.1, "--lr -0.1 (TrainConfig.lr) must be > 0"),
    ("lr", 0.0, "--lr 0.0"),
    ("lr", float("nan"), "must be a finite number > 0"),
    ("weight_decay", -1e-4, "--weight-decay -0.0001"),
    ("warmup_epochs", -1, "--warmup-epochs -1"),
    ("label_smoothing", 1.0, "--label-smoothing 1.0 (TrainConfig.label_smoothing) must be in [0, 1)"),
    ("optimizer", "sgdd", "--optimizer 'sgdd'"),
    ("select", "best", "--select 'best'"),
    ("num_workers", -1, "--workers -1"),
    ("cache_inputs", "yes", "TrainConfig.cache_inputs 'yes' must be True or False"),
], ids=lambda v: str(v))
def test_train_config_refuses_bad_values(field, value, expect):
    e = refusal(lambda: TrainConfig(**{field: value}))
    assert expect in e.what, e.what


def test_evaluate_refuses_a_batch_size_below_one(tiny_backbones):
    e = refusal(lambda: evaluate(torch.nn.Identity(), [], batch_size=0))
    assert "--batch-size 0" in e.what


# ---------------------------------------------------------------------------------------------- Job
@pytest.mark.parametrize("field,value,expect", [
    ("image_size", 0, "--image-size 0 is out of range: an input size is 1 to 4096 pixels"),
    ("image_size", -32, "--image-size -32 is out of range"),
    ("image_size", 100000, "--image-size 100000 is out of range"),
    ("image_size", 224.0, "--image-size 224.0 is not a whole number"),
    ("train_size", 0, "--train-size 0 must be a whole number ≥ 1"),
    ("normalization", "imagenet", "--normalization 'imagenet' is not one of pretrained_cfg, paper"),
    ("task", "detection", "--task 'detection'"),
    ("protocol", "test", "Job.protocol 'test'"),
    ("data_seed", "0", "--data-seed '0'"),
    ("train", {"epochs": 1}, "Job.train must be a TrainConfig"),
], ids=lambda v: str(v))
def test_job_refuses_bad_values(field, value, expect):
    e = refusal(lambda: Job(backbone="resnet10t", method="linear", data="digits", **{field: value}))
    assert expect in e.what, e.what


def test_no_image_size_is_the_backbones_own(tiny_backbones):
    backbone = tiny_backbones("resnet")
    prep = preprocessing_for(backbone, Job(backbone="resnet10t", method="linear", data="digits"))
    assert prep["image_size"] == 176  # resnet10t's pretrained_cfg, never a silent default


# -------------------------------------------------------------------------------- input sizes
def _vit(**extra):
    arch, kwargs = TINY["vit"]
    return load_backbone(arch, random_init=True, model_kwargs={**kwargs, **extra})


@pytest.mark.parametrize("kind,size,expect,fix", [
    ("resnet", 7, "--image-size 7 is below the smallest input resnet10t can use, 32 px",
     "use --image-size 32 or more (its pretrained size is 176)"),
    ("efficientnet", 16, "below the smallest input tf_efficientnet_lite0 can use, 32 px", "--image-size 32"),
    ("vit", 48, "is built for 32×32 inputs only", "use --image-size 32, or create the timm model with "
                                                  "dynamic_img_size=True"),
    ("swin", 64, "is built for 32×32 inputs only", "use --image-size 32"),
], ids=["resnet-7", "efficientnet-16", "vit-fixed", "swin-fixed"])
def test_input_sizes_a_backbone_cannot_take_are_refused(kind, size, expect, fix, tiny_backbones, tmp_path):
    arch, kwargs = TINY[kind]
    job = Job(backbone=arch, method="linear", data=str(tmp_path / "not-loaded"), random_init=True,
              model_kwargs=kwargs, image_size=size)
    e = refusal(lambda: prepare_job(job, backbone=tiny_backbones(kind)))  # before the data is looked at
    assert expect in e.what and fix in e.fix, (e.what, e.fix)


def test_a_dynamic_size_vit_takes_multiples_of_its_patch_size():
    vit = _vit(dynamic_img_size=True)
    e = refusal(lambda: check_input_size(vit, 36))
    assert "--image-size 36 is not a multiple of the patch size 8" in e.what and "32 or 40" in e.fix
    assert "smallest input" in refusal(lambda: check_input_size(vit, 4)).what
    for size in (8, 48, 64):
        check_input_size(vit, size)  # admitted, and timm indeed takes it
        assert vit(torch.zeros(1, 3, size, size)).shape == (1, vit.feature_dim)


# ----------------------------------------------------------------------------------- method options
@pytest.mark.parametrize("method,key,value,expect", [
    ("vpt-shallow", "num_tokens", "100000000000", "vpt: num_tokens=100000000000 is above the limit of 1000"),
    ("vpt-deep", "project_dim", "100000", "vpt: project_dim=100000 is above the limit of 4096"),
    ("pgn", "library_size", "10000000", "pgn: library_size=10000000 is above the limit of 16384"),
    ("pgn", "generator_width", "5000", "pgn: generator_width=5000"),
    ("lora", "r", "100000", "lora: r=100000 is above the limit of 1024"),
    ("dora", "r", "100000", "dora: r=100000"),
    ("mlp", "hidden_dim", "0", "mlp: hidden_dim=0 must be ≥ 1"),
    ("mlp", "hidden_dim", "1000000", "mlp: hidden_dim=1000000 is above the limit of 16384"),
    ("mlp", "k", "1000", "mlp: k=1000"),
    ("pro-tuning", "kernel_size", "101", "pro-tuning: kernel_size=101 is above the limit of 31"),
    ("vpt-pad", "width", "100000", "vpt-pad: width=100000 is above the limit of 2048"),
], ids=lambda v: str(v))
def test_method_options_that_size_tensors_are_bounded(method, key, value, expect):
    e = refusal(lambda: make_config(method, {key: value}))
    assert expect in e.what, e.what
    assert f"--set {key}=" in e.fix


# ---------------------------------------------------------------------------------------- memory
def _setup(folder, method="adapter", size=IMAGE_SIZE, batch=4, kind="resnet", backbone=None):
    arch, kwargs = TINY[kind]
    job = Job(backbone=arch, method=method, data=str(folder), random_init=True, model_kwargs=kwargs,
              overrides={"reduction": 4} if method == "adapter" else {}, image_size=size,
              train=TrainConfig(epochs=1, batch_size=batch, device="cpu"))
    return prepare_job(job, backbone=backbone)


def test_the_memory_estimate_follows_pixels_batch_and_backward(folder, tiny_backbones):
    backbone = tiny_backbones("resnet")
    small, large = (check_memory(_setup(folder, size=s, backbone=backbone)) for s in (64, 128))
    assert 3.5 < large["step"] / small["step"] < 4.5  # activations grow with the pixel count
    assert large["cached_images"] == 4 * small["cached_images"] == 4 * 3 * 64 * 64 * 4 * 18
    batch_64, batch_128 = (check_memory(_setup(folder, size=64, batch=b, backbone=backbone))["step"]
                           for b in (64, 128))
    assert batch_128 == pytest.approx(2 * batch_64)
    head_only = check_memory(_setup(folder, method="linear", size=64, batch=64, backbone=backbone))["step"]
    assert head_only < batch_64 / 2  # no activations kept for a backward pass through the backbone


def test_a_job_that_needs_more_memory_than_there_is_is_refused_before_allocating(folder, tiny_backbones,
                                                                                  monkeypatch, tmp_path):
    monkeypatch.setattr(run_mod, "available_memory", lambda device: 2.0 * 2**30)
    backbone = tiny_backbones("resnet")
    e = refusal(lambda: check_memory(_setup(folder, size=1024, batch=32, backbone=backbone)))
    assert "adapter on resnet10t at --image-size 1024 with --batch-size 32 needs roughly" in e.what
    assert "GiB of RAM" in e.what and "one step of 32 images" in e.what and "2.0 GiB is available" in e.what
    assert "smaller --image-size (the backbone's pretrained size is 176) or --batch-size" in e.fix

    def no_allocation(*args, **kwargs):
        raise AssertionError("the method was built before the memory check")

    monkeypatch.setattr(run_mod, "adapt", no_allocation)
    arch, kwargs = TINY["resnet"]
    job = Job(backbone=arch, method="adapter", data=str(folder), out=str(tmp_path / "out"), random_init=True,
              model_kwargs=kwargs, overrides={"reduction": 4}, image_size=1024,
              train=TrainConfig(epochs=1, batch_size=32, device="cpu"))
    assert "needs roughly" in refusal(lambda: run_job(job, backbone=backbone, progress=False)).what
    assert not (tmp_path / "out").exists()
